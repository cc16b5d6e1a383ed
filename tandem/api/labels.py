"""Label and annotation names on the objects Tandem creates or reads.

One definition for the operator (which writes them), the gateway's Kubernetes discovery and the
autoscaler (which read them, and the autoscaler writes the drain mark): a rename in one place
would silently break discovery or draining in the others.
"""

LABEL_SERVICE = "serving.tandem.dev/service"
LABEL_ROLE = "serving.tandem.dev/role"
LABEL_MODEL = "serving.tandem.dev/model"
LABEL_ENGINE = "serving.tandem.dev/engine"
ANN_SERVED_MODEL = "serving.tandem.dev/served-model"
ANN_PORT = "serving.tandem.dev/port"
ANN_BOOTSTRAP_PORT = "serving.tandem.dev/bootstrap-port"
# Where the engine publishes its KV-cache events: "PUB[,replay=REPLAY][,topic=TOPIC]", endpoints or
# ports on the pod IP (tandem.kvevents.parse_kv_events). The gateway subscribes for its exact cache view.
ANN_KV_EVENTS = "serving.tandem.dev/kv-events"
ANN_CONFIG_HASH = "serving.tandem.dev/config-hash"
# Set by the autoscaler on pods it is about to remove (value: RFC 3339 time the drain began). Such
# a pod gets no new requests; the gateway reports its in-flight count until it is idle.
ANN_DRAINING = "serving.tandem.dev/draining"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "tandem-operator"
