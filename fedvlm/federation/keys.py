"""Keys of the records exchanged with Flower: one place, never scattered string literals."""

from __future__ import annotations

# RecordDict entries
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys (server → client)
SERVER_ROUND = "server-round"
LEARNING_RATE = "lr"
PROXIMAL_MU = "proximal-mu"
FREEZE_ENCODERS = "freeze-encoders"
LOCAL_EPOCHS = "local-epochs"
ROUND_SEED = "round-seed"
EXACT_KEYS = "exact-keys"  # JSON list: float buffers a lossy codec sends as they are (running statistics)
UPDATE_CODEC = "update-codec"
UNIFORM_WEIGHTS = "uniform-weights"  # central DP: every client weighs 1 in the (secure) sum
CENTRAL_CLIPPING_NORM = "central-clipping-norm"  # privacy.central.clipping=client: clip the update to this norm
STATIC_FINGERPRINT = "static-fingerprint"  # digest of the weights that never travel (frozen backbones)

# MetricRecord keys (client → server)
NUM_EXAMPLES = "num-examples"  # Flower's weighting key (FedAvg, Eq. 4)
PARTITION_ID = "partition-id"  # also the node_config key Flower sets in simulation
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"  # train_locally: module, data, Trainer and fit
STEP_SECONDS = "step-seconds"  # inside training steps only
CLIENT_SECONDS = "client-seconds"  # the whole train message on the client, receipt to reply
SHARED_PREFIX = "explain/"  # aggregate explanation-quality metrics a client may share
EVAL_STATE_PREFIX = "state/"  # mergeable metric state, e.g. "state/detection.auroc.confmat"
SITE_COUNTS = "site-counts"  # query reply: the site's name and sample counts per split (JSON; counts only)
EVAL_SPLITS = ("val", "test")  # evaluate reply: state under "state/<split>/..." and "<split>/num-examples"
EPSILON = "privacy/epsilon"  # the client's cumulative DP-SGD ε over all its rounds (privacy.dp)

# metrics.jsonl round-row keys
EPSILON_MAX = "privacy/epsilon_max"  # the largest ε of the round's clients
CENTRAL_EPSILON = "privacy/central_epsilon"  # user-level ε of central DP after this round (privacy.central)

# Message types
QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"

# Node state (context.state) of a client, kept between rounds and fresh ClientApp processes
CODEC_RESIDUAL = "fedvlm.codec-residual"  # error feedback: what earlier rounds' updates did not send
