// Fuzzes a whole request's decoding and validation (server/forward_request.h): the input is
// parsed as an lmhead.v1.ForwardRequest for a small demo head and goes the way the service
// takes it: ParseForwardRequest over the input cut into pieces (server/received_request.h),
// which must give protobuf's verdict and message, PlanForward (wire forms, config overrides, enums,
// shapes, limits), the head for its configuration, DecodeInputs, LMHead::ValidateForward, and for
// small requests the forward itself and EncodeOutputs. Beyond what the sanitizers catch, it checks
// the contracts:
//  - every refusal has a caller's code and a message that starts with a request field path;
//  - nothing throws, and once every check has passed the forward succeeds (a LibTorch error
//    there would be a check we lack);
//  - the response's tensors fit --max_response_bytes.
#include <ATen/ATen.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/torch_errors.h"
#include "proto/lmhead/v1/lmhead.pb.h"
#include "server/forward_request.h"
#include "server/model_registry.h"
#include "server/options.h"
#include "server/received_request.h"
#include "tests/fuzz/fuzz_check.h"

namespace lmhead {
namespace {

constexpr int64_t kResponseLimit = 64 << 10;

const Options& Limits() {
  static const Options* options = [] {
    auto* o = new Options();
    o->demo_d_model = 8;
    o->demo_vocab_size = 37;
    o->max_config_variants = 3;
    o->max_response_bytes = kResponseLimit;
    return o;
  }();
  return *options;
}

const ModelRegistry& Registry() {
  static const ModelRegistry* registry = ModelRegistry::Load(Limits())->release();
  return *registry;
}

// "hidden_states.shape[1]: ...", "options.loss_div_factor_tensor: ...", "model: ...".
bool StartsWithFieldPath(absl::string_view message) {
  size_t i = 0;
  bool in_name = false;
  while (i < message.size()) {
    const char c = message[i];
    if (std::islower(static_cast<unsigned char>(c)) || c == '_') {
      in_name = true;
    } else if (c == '.' && in_name) {
      in_name = false;
    } else if (c == '[' && in_name) {
      const size_t close = message.find(']', i);
      if (close == absl::string_view::npos || close == i + 1) return false;
      for (size_t j = i + 1; j < close; ++j) {
        if (!std::isdigit(static_cast<unsigned char>(message[j]))) return false;
      }
      i = close;
    } else {
      return in_name && message.substr(i, 2) == ": ";
    }
    ++i;
  }
  return false;
}

void CheckRefusal(const absl::Status& status, const char* where) {
  const std::string text = status.ToString();
  // FAILED_PRECONDITION: a request that names shared memory, which is off here.
  LMHEAD_FUZZ_CHECK(absl::IsInvalidArgument(status) || absl::IsNotFound(status) ||
                        absl::IsResourceExhausted(status) || absl::IsUnimplemented(status) ||
                        absl::IsFailedPrecondition(status),
                    "%s: unexpected code: %s", where, text.c_str());
  LMHEAD_FUZZ_CHECK(StartsWithFieldPath(status.message()), "%s: no field path: %s", where,
                    text.c_str());
  LMHEAD_FUZZ_CHECK(LibraryErrorDetail(status).empty(), "%s: a LibTorch error: %s", where,
                    text.c_str());
}

void Run(const v1::ForwardRequest& request, const DetachedData* hidden_states_data) {
  absl::StatusOr<ForwardPlan> plan =
      PlanForward(Registry(), Limits(), request, {}, hidden_states_data);
  if (!plan.ok()) return CheckRefusal(plan.status(), "PlanForward");
  absl::StatusOr<std::shared_ptr<const LMHead>> head = plan->model->HeadFor(plan->config);
  if (!head.ok()) return CheckRefusal(head.status(), "HeadFor");
  absl::StatusOr<at::Tensor> x = CatchTorchErrors([&]() -> absl::StatusOr<at::Tensor> {
    absl::StatusOr<at::Tensor> host = DecodeInputs(request, &*plan);
    if (!host.ok()) return host;
    return host->to(ScalarTypeOf(plan->config.dtype));
  });
  if (!x.ok()) return CheckRefusal(x.status(), "DecodeInputs");
  const absl::Status valid = WithWireFields((*head)->ValidateForward(*x, plan->options), request);
  if (!valid.ok()) return CheckRefusal(valid, "ValidateForward");
  // Small enough to compute quickly: everything checked, so the forward must succeed.
  if (plan->batch * std::max<int64_t>(plan->length, 1) > 4096) return;
  absl::StatusOr<LMOutput> output = (*head)->Forward(*x, plan->options);
  LMHEAD_FUZZ_CHECK(output.ok(), "Forward after every check passed: %s",
                    output.status().ToString().c_str());
  v1::ForwardResponse response;
  const absl::Status encoded =
      CatchTorchErrors([&]() { return EncodeOutputs(*output, *plan, &response); });
  LMHEAD_FUZZ_CHECK(encoded.ok(), "EncodeOutputs: %s", encoded.ToString().c_str());
  const int64_t bytes = response.logits().data().size() + response.loss().data().size() +
                        response.ce_loss().data().size() + response.z_loss().data().size() +
                        response.argmax().data().size();
  LMHEAD_FUZZ_CHECK(bytes <= kResponseLimit, "a response of %lld tensor bytes passed the bound",
                    static_cast<long long>(bytes));
}

}  // namespace
}  // namespace lmhead

namespace {

std::string Deterministic(const lmhead::v1::ForwardRequest& message) {
  std::string bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  google::protobuf::io::CodedOutputStream coded(&stream);
  coded.SetSerializationDeterministic(true);
  message.SerializeToCodedStream(&coded);
  coded.Trim();
  return bytes;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view wire(reinterpret_cast<const char*>(data), size);
  lmhead::v1::ForwardRequest expected;
  const bool valid = expected.ParseFromArray(data, static_cast<int>(size));
  // The input in pieces as gRPC's slices would hold it: cut at three places the input picks.
  std::vector<absl::string_view> pieces;
  size_t start = 0;
  for (size_t i = 0; i < 3 && size > 0; ++i) {
    const size_t cut = std::max(start, std::min<size_t>(size, data[i % size] * (i + 1)));
    pieces.push_back(wire.substr(start, cut - start));
    start = cut;
  }
  pieces.push_back(wire.substr(start));
  lmhead::v1::ForwardRequest request;
  lmhead::DetachedData hidden_states_data;
  const absl::Status parsed = lmhead::ParseForwardRequest(pieces, &request, &hidden_states_data);
  LMHEAD_FUZZ_CHECK(parsed.ok() == valid, "ParseForwardRequest: %s where protobuf's parse %s",
                    parsed.ToString().c_str(), valid ? "succeeds" : "fails");
  if (!valid) return 0;
  lmhead::v1::ForwardRequest rejoined = request;
  if (hidden_states_data.size > 0) {
    LMHEAD_FUZZ_CHECK(request.hidden_states().data().empty(), "detached data left in the message");
    std::string bytes(hidden_states_data.size, '\0');
    lmhead::GatherDetachedData(hidden_states_data, bytes.data());
    rejoined.mutable_hidden_states()->set_data(bytes);
  }
  // Compared as serialised (deterministically): a NaN option is equal to itself there.
  LMHEAD_FUZZ_CHECK(Deterministic(rejoined) == Deterministic(expected),
                    "ParseForwardRequest's message differs from protobuf's: %s",
                    request.ShortDebugString().c_str());
  lmhead::Run(request, hidden_states_data.size > 0 ? &hidden_states_data : nullptr);
  return 0;
}
