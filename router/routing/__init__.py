"""Pure routing decisions shared by the live gateway and the discrete-event simulator."""
