"""Pure routing decisions shared by the live gateway and the discrete-event simulator.

``types`` is the contract (requests, instance state, decisions); ``capabilities`` the optional
things a policy may also do (late binding, migration, rings, an adaptive key), one Protocol each;
``config`` each policy's own parameters and the flat ``RoutingConfig`` users set;
``registry.make_policy`` builds a policy by name; ``scheduler.Scheduler`` owns the late-binding
queues and the gateway accounting.
"""
