#include "server/service.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <variant>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "core/lm_head.h"
#include "core/torch_errors.h"
#include "server/forward_request.h"
#include "server/logging.h"
#include "server/model_registry.h"
#include "server/read_ahead.h"
#include "server/status.h"

namespace lmhead {
namespace {

using Clock = std::chrono::steady_clock;

int64_t MicrosBetween(Clock::time_point start, Clock::time_point end) {
  return std::chrono::duration_cast<std::chrono::microseconds>(end - start).count();
}

// OK while the caller still wants the answer: DEADLINE_EXCEEDED past the call's deadline,
// CANCELLED once the client cancelled. The client's own deadline ends earlier than ours (ours
// counts from the request's arrival), and at its deadline the client cancels: a cancellation
// within kDeadlineSlack of our deadline is taken for the deadline.
absl::Status CheckStillWanted(const grpc::ServerContext& context) {
  constexpr auto kDeadlineSlack = std::chrono::seconds(1);
  const auto now = std::chrono::system_clock::now();
  const bool cancelled = context.IsCancelled();
  if (now > context.deadline() || (cancelled && now + kDeadlineSlack > context.deadline())) {
    return absl::DeadlineExceededError("deadline exceeded before the work was done");
  }
  if (cancelled) return absl::CancelledError("the client cancelled the call");
  return absl::OkStatus();
}

// One Forward request (or stream micro-batch) between decoding and its response.
struct PreparedForward {
  // Streams: the message the decoded tensors may alias (unary calls keep their own).
  std::unique_ptr<v1::ForwardRequest> owned_request;
  const v1::ForwardRequest* request = nullptr;  // the request, owned or the caller's
  ForwardPlan plan;
  std::shared_ptr<const LMHead> head;
  at::Tensor x;  // on the head's device, in the compute dtype
  int64_t nonfinite = 0;
  Clock::time_point start;
  Clock::time_point decoded;
  // Set when the inputs were copied on a side stream: the compute waits for it.
  std::optional<c10::Event> uploaded;
};

// Checks `request` against the model and the limits, decodes its tensors, copies them to the
// head's device on the current stream, and checks them as LMHead::Forward will. May throw
// c10::Error.
absl::StatusOr<PreparedForward> PrepareForwardUnchecked(const ModelRegistry& registry,
                                                        const Options& limits,
                                                        const grpc::ServerContext& context,
                                                        const v1::ForwardRequest& request) {
  PreparedForward prepared;
  prepared.request = &request;
  prepared.start = Clock::now();
  absl::StatusOr<ForwardPlan> plan = PlanForward(registry, limits, request);
  if (!plan.ok()) return plan.status();
  prepared.plan = *std::move(plan);
  // The deadline and cancellation are checked again between chunks of a fused forward.
  prepared.plan.options.interrupt_check = [&context]() { return CheckStillWanted(context); };
  // The head for this configuration: the model's, or a converted copy.
  absl::StatusOr<std::shared_ptr<const LMHead>> head =
      prepared.plan.model->HeadFor(prepared.plan.config);
  if (!head.ok()) {
    // No room for another converted copy of the weights: the same request would fail again.
    return absl::IsResourceExhausted(head.status()) ? NotRetryable(head.status()) : head.status();
  }
  prepared.head = *std::move(head);
  absl::StatusOr<at::Tensor> x =
      DecodeInputs(request, prepared.head->device(), &prepared.plan, &prepared.nonfinite);
  if (!x.ok()) return x.status();
  prepared.x = *std::move(x);
  if (absl::Status status = prepared.head->ValidateForward(prepared.x, prepared.plan.options);
      !status.ok()) {
    return WithWireFields(status, request);
  }
  prepared.decoded = Clock::now();
  return prepared;
}

// Runs the forward of `prepared` on the current stream and writes the response. May throw
// c10::Error.
absl::Status FinishForwardUnchecked(PreparedForward& prepared, v1::ForwardResponse* response) {
  if (prepared.uploaded.has_value()) {
    const c10::Device device = prepared.x.device();
    const c10::impl::VirtualGuardImpl guard(device.type());
    const c10::Stream compute = guard.getStream(device);
    prepared.uploaded->block(compute);
    // The inputs were allocated on the upload stream; their memory must outlive this stream's
    // use of it too.
    guard.recordDataPtrOnStream(prepared.x.storage().data_ptr(), compute);
    if (const auto* factor = std::get_if<at::Tensor>(&prepared.plan.options.loss_div_factor)) {
      guard.recordDataPtrOnStream(factor->storage().data_ptr(), compute);
    }
  }
  absl::StatusOr<LMOutput> output = prepared.head->Forward(prepared.x, prepared.plan.options);
  if (!output.ok()) return WithWireFields(output.status(), *prepared.request);
  if (!prepared.x.is_cpu()) {
    // Waits for the device, so that compute_us covers its work; encoding then converts the
    // outputs to their wire dtypes on the device and copies them out.
    const c10::impl::VirtualGuardImpl guard(prepared.x.device().type());
    guard.synchronizeStream(guard.getStream(prepared.x.device()));
  }
  const Clock::time_point computed = Clock::now();

  response->Clear();
  if (absl::Status status = EncodeOutputs(*output, prepared.plan, response); !status.ok()) {
    return status;
  }
  response->set_num_nonfinite_inputs(prepared.nonfinite);
  const Clock::time_point encoded = Clock::now();
  v1::ServerTimings* timings = response->mutable_timings();
  timings->set_decode_us(MicrosBetween(prepared.start, prepared.decoded));
  timings->set_compute_us(MicrosBetween(prepared.decoded, computed));
  timings->set_encode_us(MicrosBetween(computed, encoded));
  timings->set_total_us(MicrosBetween(prepared.start, encoded));
  return absl::OkStatus();
}

// A unary Forward, all on the calling thread.
absl::Status RunForward(const ModelRegistry& registry, const Options& options,
                        const grpc::ServerContext& context, const v1::ForwardRequest& request,
                        v1::ForwardResponse* response) {
  return CatchTorchErrors([&]() -> absl::Status {
    absl::StatusOr<PreparedForward> prepared =
        PrepareForwardUnchecked(registry, options, context, request);
    if (!prepared.ok()) return prepared.status();
    return FinishForwardUnchecked(*prepared, response);
  });
}

// A stream's micro-batch, prepared on the read-ahead thread. With `upload_stream` (CUDA) the
// inputs are copied on that stream and `uploaded` marks their arrival.
absl::StatusOr<PreparedForward> PrepareMicroBatch(const ModelRegistry& registry,
                                                  const Options& options,
                                                  const grpc::ServerContext& context,
                                                  std::unique_ptr<v1::ForwardRequest> request,
                                                  const std::optional<c10::Stream>& upload_stream) {
  return CatchTorchErrors([&]() -> absl::StatusOr<PreparedForward> {
    std::optional<c10::StreamGuard> on_upload_stream;
    if (upload_stream.has_value()) on_upload_stream.emplace(*upload_stream);
    absl::StatusOr<PreparedForward> prepared =
        PrepareForwardUnchecked(registry, options, context, *request);
    if (!prepared.ok()) return prepared.status();
    prepared->owned_request = std::move(request);
    if (upload_stream.has_value()) {
      c10::Event uploaded(upload_stream->device_type());
      uploaded.record(*upload_stream);
      prepared->uploaded = std::move(uploaded);
    }
    return prepared;
  });
}

// Echoes the request id as `x-request-id`: among the response's headers when the call succeeds
// or a stream has answered, else in its trailers alone. A refusal must be a trailers-only
// response: headers commit a call, and gRPC's retry policy then would not retry it.
void EchoRequestId(grpc::ServerContext* context, const std::string& request_id, bool headers) {
  if (headers) {
    context->AddInitialMetadata("x-request-id", request_id);
  } else {
    context->AddTrailingMetadata("x-request-id", request_id);
  }
}

// The caller's `x-request-id` header, or a fresh id.
std::string RequestIdOf(const grpc::ServerContext& context) {
  const auto& metadata = context.client_metadata();
  // Used as given only when it is 1-128 characters of [A-Za-z0-9._:-] (it goes into every log
  // line of the call).
  if (auto it = metadata.find("x-request-id");
      it != metadata.end() && !it->second.empty() && it->second.size() <= 128 &&
      std::all_of(it->second.begin(), it->second.end(), [](char c) {
        return absl::ascii_isalnum(c) || c == '.' || c == '_' || c == ':' || c == '-';
      })) {
    return std::string(it->second.data(), it->second.size());
  }
  return NewRequestId();
}

// What the caller is told: the status as it is, except that a library's failure (its text is
// only in the log, see core/torch_errors.h) points to the log line by request id.
grpc::Status ForCaller(const absl::Status& status, absl::string_view request_id) {
  if (status.ok() || LibraryErrorDetail(status).empty()) return ToGrpcStatus(status);
  const absl::string_view hint = status.code() == absl::StatusCode::kResourceExhausted
                                     ? "; retry later or send fewer tokens per call"
                                     : "; the server's log has the details";
  return ToGrpcStatus(absl::Status(
      status.code(), absl::StrCat(status.message(), hint, " (request id ", request_id, ")")));
}

void LogOutcome(absl::string_view request_id, absl::string_view what, const absl::Status& status) {
  if (status.ok()) {
    LogInfo(request_id, absl::StrCat(what, " ok"));
  } else if (status.code() == absl::StatusCode::kInternal ||
             status.code() == absl::StatusCode::kUnknown) {
    LogError(request_id, absl::StrCat(what, " failed: ", status.ToString()));
  } else {
    LogWarning(request_id, absl::StrCat(what, " failed: ", status.ToString()));
  }
}

}  // namespace

LMHeadServiceImpl::LMHeadServiceImpl(const Options& options)
    : options_(options), limiter_(options.max_concurrent_requests) {}

LMHeadServiceImpl::~LMHeadServiceImpl() = default;

void LMHeadServiceImpl::SetRegistry(std::shared_ptr<const ModelRegistry> registry) {
  std::atomic_store(&registry_, std::move(registry));
}

std::shared_ptr<const ModelRegistry> LMHeadServiceImpl::registry() const {
  return std::atomic_load(&registry_);
}

bool LMHeadServiceImpl::WaitIdle(std::chrono::system_clock::time_point deadline) const {
  while (limiter_.in_use() > 0) {
    if (std::chrono::system_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

grpc::Status LMHeadServiceImpl::Forward(grpc::ServerContext* context,
                                        const v1::ForwardRequest* request,
                                        v1::ForwardResponse* response) {
  const std::string request_id = RequestIdOf(*context);
  absl::Status status;
  if (draining_) {
    status = absl::UnavailableError("the server is shutting down");
  } else if (std::shared_ptr<const ModelRegistry> models = registry(); models == nullptr) {
    status = absl::UnavailableError("the server is still loading its models");
  } else if (ConcurrencyLimiter::Slot slot = limiter_.TryAcquire(); !slot) {
    status = absl::ResourceExhaustedError(
        absl::StrCat("too many concurrent requests: ", limiter_.max_in_use(),
                     " running (--max_concurrent_requests); retry later"));
  } else if (status = CheckStillWanted(*context); status.ok()) {
    status = RunForward(*models, options_, *context, *request, response);
    if (status.ok()) {
      nonfinite_inputs_ += response->num_nonfinite_inputs();
      if (response->num_nonfinite_inputs() > 0) {
        LogWarning(request_id, absl::StrCat(response->num_nonfinite_inputs(),
                                            " non-finite hidden-state values (propagated)"));
      }
    }
  }
  LogOutcome(
      request_id,
      absl::StrCat("Forward model=", CallerText(request->model()),
                   status.ok() ? absl::StrCat(" total_us=", response->timings().total_us()) : ""),
      status);
  EchoRequestId(context, request_id, status.ok());
  AddRetryAdvice(status, context);
  return ForCaller(status, request_id);
}

grpc::Status LMHeadServiceImpl::ForwardStream(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::ForwardResponse, v1::ForwardRequest>* stream) {
  const std::string request_id = RequestIdOf(*context);
  std::shared_ptr<const ModelRegistry> models = registry();
  if (draining_ || models == nullptr) {
    const absl::Status status = absl::UnavailableError(
        draining_ ? "the server is shutting down" : "the server is still loading its models");
    LogOutcome(request_id, "ForwardStream", status);
    EchoRequestId(context, request_id, /*headers=*/false);
    return ToGrpcStatus(status);
  }
  ConcurrencyLimiter::Slot slot = limiter_.TryAcquire();
  if (!slot) {
    const absl::Status status = absl::ResourceExhaustedError(
        absl::StrCat("too many concurrent requests: ", limiter_.max_in_use(),
                     " running (--max_concurrent_requests); retry later"));
    LogOutcome(request_id, "ForwardStream", status);
    EchoRequestId(context, request_id, /*headers=*/false);
    return ToGrpcStatus(status);
  }
  // With --stream_read_ahead two micro-batches at most are held: the one computing and the next,
  // which a second thread reads, decodes and copies to the device meanwhile (on CUDA, on a
  // stream of its own). Without, one at a time on this thread.
  const c10::Device device(options_.device);
  std::optional<c10::Stream> upload_stream;
  if (options_.stream_read_ahead && device.is_cuda()) {
    upload_stream =
        c10::impl::VirtualGuardImpl(device.type())
            .getStreamFromGlobalPool(
                {device.type(), device.has_index() ? device.index() : c10::DeviceIndex{0}});
  }
  using Prepared = absl::StatusOr<PreparedForward>;
  const auto read_and_prepare = [&]() -> std::optional<Prepared> {
    auto request = std::make_unique<v1::ForwardRequest>();
    TakeRequestParseFailure();
    if (!stream->Read(request.get())) {
      if (!TakeRequestParseFailure()) return std::nullopt;  // the client's end of the stream
      return Prepared(absl::InvalidArgumentError(
          "request: not a valid lmhead.v1.ForwardRequest message (the protobuf wire format could "
          "not be parsed)"));
    }
    return PrepareMicroBatch(*models, options_, *context, std::move(request), upload_stream);
  };
  std::optional<ReadAhead<Prepared>> read_ahead;
  if (options_.stream_read_ahead) {
    read_ahead.emplace(read_and_prepare,
                       [](const Prepared& prepared) { return !prepared.ok(); });  // ends reading
  }
  v1::ForwardResponse response;
  int64_t index = 0;
  int64_t nonfinite = 0;
  absl::Status status;
  while (true) {
    if (status = CheckStillWanted(*context); !status.ok()) break;
    std::optional<Prepared> prepared = read_ahead ? read_ahead->Next() : read_and_prepare();
    if (!prepared.has_value()) break;
    status = prepared->ok()
                 ? CatchTorchErrors([&]() { return FinishForwardUnchecked(**prepared, &response); })
                 : prepared->status();
    if (!status.ok()) {
      absl::Status numbered(status.code(),
                            absl::StrCat(status.message(), " (micro-batch ", index, ")"));
      status.ForEachPayload([&numbered](absl::string_view url, const absl::Cord& payload) {
        numbered.SetPayload(url, payload);
      });
      status = std::move(numbered);
      break;
    }
    nonfinite += response.num_nonfinite_inputs();
    LogDebug(request_id,
             absl::StrCat("micro-batch ", index, " total_us=", response.timings().total_us()));
    if (index == 0) EchoRequestId(context, request_id, /*headers=*/true);
    if (!stream->Write(response)) {
      status = absl::CancelledError("the client went away");
      break;
    }
    ++index;
  }
  // When the stream ends early the read-ahead thread may be inside Read: a message still
  // arriving is let finish (up to a second), so the client gets this status; a client that
  // sends each message only after the previous answer would keep Read waiting, and cancelling
  // the call releases it (that client then sees CANCELLED).
  if (read_ahead && !read_ahead->Stop(std::chrono::seconds(1))) context->TryCancel();
  if (status.ok() && context->IsCancelled()) {
    status = absl::CancelledError("the client cancelled the stream");
  }
  nonfinite_inputs_ += nonfinite;
  if (nonfinite > 0) {
    LogWarning(request_id, absl::StrCat(nonfinite, " non-finite hidden-state values (propagated)"));
  }
  LogOutcome(request_id, absl::StrCat("ForwardStream ", index, " micro-batches"), status);
  if (index == 0) EchoRequestId(context, request_id, /*headers=*/false);
  AddRetryAdvice(status, context);
  return ForCaller(status, request_id);
}

grpc::Status LMHeadServiceImpl::ListModels(grpc::ServerContext* context,
                                           const v1::ListModelsRequest* /*request*/,
                                           v1::ListModelsResponse* response) {
  const std::string request_id = RequestIdOf(*context);
  std::shared_ptr<const ModelRegistry> models = registry();
  absl::Status status;
  if (models == nullptr) {
    status = absl::UnavailableError("the server is still loading its models");
  } else {
    for (const auto& model : models->List()) {
      *response->add_models() = ModelInfoToWire(*model, options_.expose_model_paths);
    }
    response->set_default_model(models->default_model());
  }
  LogOutcome(request_id, "ListModels", status);
  EchoRequestId(context, request_id, status.ok());
  return ToGrpcStatus(status);
}

grpc::Status LMHeadServiceImpl::GetModel(grpc::ServerContext* context,
                                         const v1::GetModelRequest* request,
                                         v1::ModelInfo* response) {
  const std::string request_id = RequestIdOf(*context);
  std::shared_ptr<const ModelRegistry> models = registry();
  absl::Status status;
  if (models == nullptr) {
    status = absl::UnavailableError("the server is still loading its models");
  } else if (absl::StatusOr<std::shared_ptr<const Model>> model = models->Find(request->name());
             model.ok()) {
    *response = ModelInfoToWire(**model, options_.expose_model_paths);
  } else {
    // The registry names ForwardRequest's field, `model`; here the field is `name`.
    status = absl::Status(model.status().code(),
                          absl::StrCat("name", model.status().message().substr(5)));
  }
  LogOutcome(request_id, absl::StrCat("GetModel name=", CallerText(request->name())), status);
  EchoRequestId(context, request_id, status.ok());
  return ToGrpcStatus(status);
}

}  // namespace lmhead
