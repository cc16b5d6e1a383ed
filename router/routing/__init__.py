"""Pure routing decisions shared by the live gateway and the discrete-event simulator.

``types`` is the contract (requests, instance state, decisions); ``registry.make_policy`` builds a
policy by name; ``scheduler.Scheduler`` owns the late-binding queues and the gateway accounting.
"""
