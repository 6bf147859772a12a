// The wire form of a forward, between the gRPC handlers and the core: a ForwardRequest checked
// against its model and the server's limits before anything is allocated (PlanForward, which
// also resolves the shared-memory regions the request names), its tensors decoded
// (DecodeInputs), the core's outputs encoded (EncodeOutputs), and the wire description of a
// model. Protobuf messages and LibTorch tensors; no gRPC calls. Every error names the request's
// field (docs/API.md "Validation and status codes").
#ifndef LMHEAD_SERVER_FORWARD_REQUEST_H_
#define LMHEAD_SERVER_FORWARD_REQUEST_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/lm_head.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "server/model_registry.h"
#include "server/options.h"
#include "server/received_request.h"
#include "server/shared_memory/shared_memory.h"

namespace lmhead {

// Bytes of a registered shared-memory region that a request names (Tensor.shared_memory, or an
// entry of ForwardRequest.outputs), found and bounds-checked. Holding it keeps the region mapped.
struct RegionSlice {
  std::string field;  // the request's field: "hidden_states.shared_memory", "outputs.logits"
  std::shared_ptr<const Region> region;
  std::string id;  // the region's id, as the request gave it
  uint64_t offset = 0;
  uint64_t byte_size = 0;
};

// What a request may reach in shared memory: the server's regions (null: shared memory is off,
// --allow_shared_memory) and the connection the request came on (grpc::ServerContext::peer()).
struct SharedMemoryAccess {
  const RegionRegistry* regions = nullptr;
  std::string peer;
};

// A checked request: what to run and how, before any tensor exists.
struct ForwardPlan {
  std::shared_ptr<const Model> model;
  LMHeadConfig config;     // the model's, with the request's overrides
  ForwardOptions options;  // the scalar options; tensors are added by DecodeInputs
  v1::DataType logits_dtype = v1::DATA_TYPE_UNSPECIFIED;
  int64_t batch = 0;
  int64_t length = 0;
  int64_t kept = 0;  // positions per row that logits_to_keep keeps
  // Inputs whose bytes are in shared memory, by field ("hidden_states", "labels",
  // "options.logits_to_keep_positions", "options.loss_div_factor_tensor"), and outputs to write
  // there, by name ("logits", "loss", "ce_loss", "z_loss", "argmax"). Empty without shared memory.
  std::map<std::string, RegionSlice> shared_inputs;
  std::map<std::string, RegionSlice> shared_outputs;
  // hidden_states.data when the frontend kept it out of the message (server/received_request.h);
  // it lives as long as the request.
  const DetachedData* hidden_states_data = nullptr;
};

// Checks every field of `request` against its model and `limits`: the model's name, the config
// overrides, the enums, each tensor's wire form (dtype, rank, sizes, byte length), the shapes
// against each other and the model, a tensor divisor's broadcast, the outputs named in
// request.outputs (produced by this call, sizes exact) and the response's size
// (--max_response_bytes, outputs written to regions not counted). Then resolves every region
// the request names through `shared_memory` and checks offset + byte_size against the region's
// size: FAILED_PRECONDITION when shared memory is off, NOT_FOUND for a region this connection
// did not register. `hidden_states_data`, when not null, is the request's hidden_states.data,
// kept out of the message (ReceivedForwardRequest). Reads shapes and enums only; allocates no
// tensor data.
absl::StatusOr<ForwardPlan> PlanForward(const ModelRegistry& registry, const Options& limits,
                                        const v1::ForwardRequest& request,
                                        const SharedMemoryAccess& shared_memory = {},
                                        const DetachedData* hidden_states_data = nullptr);

// The request's tensors, in their wire dtypes: the hidden states (returned; the executor moves
// them to its device, counts their NaN/infinite values and converts them to the compute dtype
// there), and labels (int64), positions and a divisor tensor into plan->options. They alias the
// request where they can, so `request` must outlive them; hidden states in a region are read
// there (on the host, or on the region's CUDA device), while the index tensors and the divisor
// are copied out of their regions into host memory of their own before anyone validates them.
// Hidden states kept out of the message (plan->hidden_states_data) are gathered into host memory
// of their own, pinned when `pinned` (for a CUDA device: the one copy before the transfer).
// May throw c10::Error.
absl::StatusOr<at::Tensor> DecodeInputs(const v1::ForwardRequest& request, ForwardPlan* plan,
                                        bool pinned = false);

// Writes LMHead.forward's outputs and the bookkeeping fields (num_scored_tokens, model, version)
// into `response`; an output that the plan sends to a region is written there, and its response
// tensor has dtype, shape and shared_memory but no data. FAILED_PRECONDITION when a region the
// call used shrank meanwhile (Region::shrunk). May throw c10::Error.
absl::Status EncodeOutputs(const LMOutput& output, const ForwardPlan& plan,
                           v1::ForwardResponse* response);

// A core status whose message starts with a forward argument's name ("labels: ..."), with that
// name replaced by the request's field path ("options.logits_to_keep_positions: ..."); other
// statuses unchanged.
absl::Status WithWireFields(const absl::Status& status, const v1::ForwardRequest& request);

// The tensors of `outputs` (each set only when asked for), named as in v1::ScoringOutputs, in the
// proto's order.
std::vector<std::pair<absl::string_view, std::optional<at::Tensor>*>> ScoringTensors(
    ScoringOutputs& outputs);

// ListModels' description of `model`; its source is the file's name unless `expose_path`.
v1::ModelInfo ModelInfoToWire(const Model& model, bool expose_path);

}  // namespace lmhead

#endif  // LMHEAD_SERVER_FORWARD_REQUEST_H_
