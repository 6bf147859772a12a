"""Python client of the lmhead service: OLMo-core's LMHead.forward over gRPC (lmhead.v1).

    from lmhead_client import RemoteLMHead
    head = RemoteLMHead("127.0.0.1:50051")
    out = head.forward(x, labels=labels, z_loss_multiplier=1e-4)   # as LMHead.forward
    scores = head.score(x, labels, label_logprobs=True, top_k=5)   # no logits sent back

README.md has the details. The stubs in _proto/ are generated from the .proto files by the
package build (`pip install client/python`), or in the source tree by generate_stubs.sh.
"""

try:
    from lmhead_client._proto.lmhead.v1 import lmhead_pb2  # noqa: F401
except ModuleNotFoundError as e:  # pragma: no cover - a checkout without generated stubs
    if e.name and e.name.startswith("lmhead_client._proto"):
        raise ImportError("lmhead_client: the gRPC stubs are missing: install the package "
                          "(pip install client/python generates them), or run "
                          "client/python/generate_stubs.sh to use it from the source tree") from e
    raise

from lmhead_client._tensors import BF16
from lmhead_client.client import (LMHeadError, LMOutputWithLoss, RemoteLMHead, Scores,
                                  StreamMicroBatch, _deprecated_name)

__all__ = ["BF16", "LMHeadError", "LMOutputWithLoss", "RemoteLMHead", "Scores",
           "StreamMicroBatch"]


def __getattr__(name: str):
    """Old names (StreamChunk: StreamMicroBatch), for one release, with a DeprecationWarning."""
    return _deprecated_name(__name__, name, globals())
