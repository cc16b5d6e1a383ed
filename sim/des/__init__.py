"""Discrete-event simulation of a routed pool of simulated engines (``tandem.sim.des``)."""

from tandem.sim.des.simulator import DESConfig, DESResult, PreparedRequest, RequestResult, Simulation, prepare, simulate

__all__ = ["DESConfig", "DESResult", "PreparedRequest", "RequestResult", "Simulation", "prepare", "simulate"]
