"""Engine performance: the cost model, profile loading and the measured profile data.

Shared ground: the routing core's estimate, the gateway, the simulators and the autoscaler all
time engine work with the same model, so it lives below all of them.
"""
