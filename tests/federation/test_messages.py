import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedvlm.federation.messages import content_bytes


def test_content_bytes_counts_the_array_payload_and_every_other_record() -> None:
    arrays = ArrayRecord([np.zeros(1000, dtype=np.float32)])
    weights_only = content_bytes(RecordDict({"arrays": arrays}))
    assert 4000 <= weights_only < 4000 + 256  # the float32 payload plus framing
    with_metrics = content_bytes(
        RecordDict({"arrays": arrays, "metrics": MetricRecord({f"m{i}": float(i) for i in range(10)})})
    )
    assert with_metrics - weights_only >= 10 * 8  # ten doubles travel too
    with_config = content_bytes(RecordDict({"arrays": arrays, "config": ConfigRecord({"note": "x" * 500})}))
    assert with_config - weights_only >= 500
