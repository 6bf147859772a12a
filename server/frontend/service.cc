#include "server/frontend/service.h"

#include <ATen/ATen.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/method_handler.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/time.h"
#include "core/dtype.h"
#include "core/lm_head.h"
#include "core/torch_errors.h"
#include "server/forward_request.h"
#include "server/logging.h"
#include "server/model_registry.h"
#include "server/read_ahead.h"
#include "server/received_request.h"
#include "server/scheduler/scheduler.h"
#include "server/shared_memory/shared_memory.h"
#include "server/status.h"

namespace lmhead {
namespace {

using Clock = std::chrono::steady_clock;

// The method paths of lmhead.v1.LMHeadService (proto/lmhead/v1/lmhead.proto).
constexpr char kForwardMethod[] = "/lmhead.v1.LMHeadService/Forward";
constexpr char kForwardStreamMethod[] = "/lmhead.v1.LMHeadService/ForwardStream";
constexpr char kListModelsMethod[] = "/lmhead.v1.LMHeadService/ListModels";
constexpr char kGetModelMethod[] = "/lmhead.v1.LMHeadService/GetModel";
constexpr char kSharedMemoryMethod[] = "/lmhead.v1.LMHeadService/SharedMemory";

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

// A Forward call or stream micro-batch: its request, plan and job, from decoding to encoding.
struct Call {
  // Streams: the request the decoded tensors alias (unary calls keep their own).
  std::shared_ptr<const ReceivedForwardRequest> owned_request;
  const v1::ForwardRequest* request = nullptr;
  std::shared_ptr<Job> job;
  Clock::time_point start;
  Clock::time_point decoded;
};

// Checks `request` against its model and the limits, decodes its tensors on the host and checks
// them with the core's rules (LMHead::ValidateForward: among others the values of the index
// tensors, which only the core knows how to judge): the job to queue, refused before it waits or
// computes. `stream_ending`, for a stream's micro-batch, is set once the stream stops: the job
// is then no longer wanted. May throw c10::Error.
absl::StatusOr<Call> Decode(const ModelRegistry& registry, const Options& limits,
                            const SharedMemoryAccess& shared_memory,
                            const grpc::ServerContext& context,
                            std::shared_ptr<const ReceivedForwardRequest> owned_request,
                            const ReceivedForwardRequest& received,
                            const std::atomic<bool>* stream_ending = nullptr) {
  Call call;
  call.start = Clock::now();
  call.owned_request = std::move(owned_request);
  const v1::ForwardRequest& request = received.message();
  call.request = &request;
  absl::StatusOr<ForwardPlan> plan =
      PlanForward(registry, limits, request, shared_memory, received.hidden_states_data());
  if (!plan.ok()) return plan.status();
  auto job = std::make_shared<Job>();
  job->plan = *std::move(plan);
  // The head for this configuration on the first executor's device: the model's, or a converted
  // copy (the others make theirs alike).
  absl::StatusOr<std::shared_ptr<const LMHead>> head = job->plan.model->HeadFor(job->plan.config);
  if (!head.ok()) return head.status();
  // Hidden states still in the received buffers are gathered straight into pinned memory for a
  // GPU: the one host copy before the transfer.
  absl::StatusOr<at::Tensor> x =
      DecodeInputs(request, &job->plan, /*pinned=*/(*head)->device().is_cuda());
  if (!x.ok()) return x.status();
  job->x = *std::move(x);
  // One element on the head's device, broadcast to x's shape: what the core checks of x (rank,
  // sizes, dtype, device) without a copy of x.
  const at::Tensor shape_of_x = at::empty({1}, at::TensorOptions()
                                                   .device((*head)->device())
                                                   .dtype(ScalarTypeOf((*head)->config().dtype)))
                                    .expand(job->x.sizes());
  if (absl::Status valid = (*head)->ValidateForward(shape_of_x, job->plan.options); !valid.ok()) {
    return WithWireFields(valid, request);
  }
  // A small call whose hidden states are in the message (or in a POSIX region) is staged in
  // pinned memory here, on the caller's thread, so that the executor's copy to the GPU is one
  // asynchronous transfer; a large one is staged by the executor (PlaceInputs), which bounds the
  // pinned memory to its two batches in flight. Hidden states in a CUDA shared-memory region are
  // on a device already; those gathered from the received buffers are pinned already.
  constexpr int64_t kStagedHereBytes = int64_t{16} << 20;
  if ((*head)->device().is_cuda() && job->x.is_cpu() && job->x.nbytes() <= kStagedHereBytes) {
    job->x = job->x.pin_memory();
  }
  job->tokens = job->plan.batch * job->plan.length;
  // The model object, not only its name: a model replaced by LoadModel keeps its name, and its
  // queued calls must not share a batch with the new one's.
  job->batch_key = absl::StrCat(job->plan.model->name(), "@",
                                absl::Hex(reinterpret_cast<uintptr_t>(job->plan.model.get())), "\n",
                                job->plan.model->VariantKey(job->plan.config));
  job->still_wanted = [&context, stream_ending]() {
    if (stream_ending != nullptr && stream_ending->load()) {
      return absl::CancelledError("the stream ended before this micro-batch ran");
    }
    return CheckStillWanted(context);
  };
  call.job = std::move(job);
  call.decoded = Clock::now();
  return call;
}

// Waits for `job`'s answer. A job whose caller stops wanting it is withdrawn from the queue; one
// already running is waited for (the core polls still_wanted between tiles).
absl::StatusOr<LMOutput> AwaitJob(Scheduler& scheduler, Job& job) {
  while (!job.done.WaitForNotificationWithTimeout(absl::Milliseconds(10))) {
    if (absl::Status wanted = job.still_wanted(); !wanted.ok() && scheduler.Withdraw(job)) {
      return wanted;
    }
  }
  return std::move(job.result);
}

// Encodes a finished call's answer into `response`. May throw c10::Error.
absl::Status Encode(Call& call, absl::StatusOr<LMOutput> output, v1::ForwardResponse* response,
                    Metrics* metrics) {
  if (!output.ok()) return WithWireFields(output.status(), *call.request);
  response->Clear();
  if (absl::Status status = EncodeOutputs(*output, call.job->plan, response); !status.ok()) {
    return status;
  }
  response->set_num_nonfinite_inputs(call.job->nonfinite);
  const Clock::time_point encoded = Clock::now();
  v1::ServerTimings* timings = response->mutable_timings();
  timings->set_decode_us(MicrosBetween(call.start, call.decoded));
  timings->set_queue_us(call.job->queue_us);
  timings->set_compute_us(call.job->compute_us);
  timings->set_batch_size(call.job->batch_size);
  timings->set_encode_us(std::max<int64_t>(
      0, MicrosBetween(call.decoded, encoded) - call.job->queue_us - call.job->compute_us));
  timings->set_total_us(MicrosBetween(call.start, encoded));
  if (metrics != nullptr) {
    metrics->RecordForward(call.job->plan.model->name(), call.job->tokens,
                           response->num_scored_tokens(), timings->decode_us(), timings->queue_us(),
                           timings->compute_us(), timings->encode_us(), timings->batch_size());
  }
  return absl::OkStatus();
}

// The caller's header `name`, or "" when absent.
absl::string_view Header(const grpc::ServerContext& context, absl::string_view name) {
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find(grpc::string_ref(name.data(), name.size()));
  return it == metadata.end() ? absl::string_view()
                              : absl::string_view(it->second.data(), it->second.size());
}

// `value` if it is a W3C traceparent (version-trace_id-parent_id-flags in lower-case hex, the
// version not ff, neither id all zeros, as W3C Trace Context defines the header),
// else "".
absl::string_view ValidTraceparent(absl::string_view value) {
  const auto hex = [](absl::string_view part) {
    return std::all_of(part.begin(), part.end(),
                       [](char c) { return absl::ascii_isdigit(c) || (c >= 'a' && c <= 'f'); });
  };
  const auto zeros = [](absl::string_view part) {
    return std::all_of(part.begin(), part.end(), [](char c) { return c == '0'; });
  };
  // Versions after 00 may append fields ("-..."); their first four parse as 00's.
  if (value.size() < 55 || value[2] != '-' || value[35] != '-' || value[52] != '-' ||
      (value.size() > 55 && (value.substr(0, 2) == "00" || value[55] != '-'))) {
    return "";
  }
  const absl::string_view version = value.substr(0, 2), trace_id = value.substr(3, 32),
                          parent_id = value.substr(36, 16), flags = value.substr(53, 2);
  if (!hex(version) || !hex(trace_id) || !hex(parent_id) || !hex(flags) || version == "ff" ||
      zeros(trace_id) || zeros(parent_id)) {
    return "";
  }
  return value;
}

// The call's request id: the caller's `x-request-id` when it is 1-128 characters of
// [A-Za-z0-9._:-] (it goes into every log line of the call), else the trace id of a valid W3C
// `traceparent`, else a fresh id.
std::string RequestIdOf(const grpc::ServerContext& context) {
  const absl::string_view given = Header(context, "x-request-id");
  if (!given.empty() && given.size() <= 128 && std::all_of(given.begin(), given.end(), [](char c) {
        return absl::ascii_isalnum(c) || c == '.' || c == '_' || c == ':' || c == '-';
      })) {
    return std::string(given);
  }
  if (const absl::string_view trace = ValidTraceparent(Header(context, "traceparent"));
      !trace.empty()) {
    return std::string(trace.substr(3, 32));
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

// The prologue every handler shares: the call's request id (and W3C traceparent, "" when none
// or invalid) and the loaded models, or why the
// call cannot be served (still loading; for forwards, draining).
struct Admission {
  std::string request_id;
  std::string traceparent;
  std::string method;          // the RPC's name, for the metrics
  Metrics* metrics = nullptr;  // null: none
  std::shared_ptr<const ModelRegistry> models;
  absl::Status status;
};

// Echoes the request id as `x-request-id`, and the caller's traceparent: among the response's
// headers when the call succeeds or a stream has answered, else in its trailers alone. A
// refusal must be a trailers-only response: headers commit a call, and gRPC's retry policy then
// would not retry it.
void EchoRequestId(grpc::ServerContext* context, const Admission& admission, bool headers) {
  const auto echo = [&](const std::string& key, const std::string& value) {
    if (headers) {
      context->AddInitialMetadata(key, value);
    } else {
      context->AddTrailingMetadata(key, value);
    }
  };
  echo("x-request-id", admission.request_id);
  if (!admission.traceparent.empty()) echo("traceparent", admission.traceparent);
}

// The epilogue every handler shares: logs the outcome, echoes the request id (in the headers
// when `answered`), adds retry advice and returns what the caller is told.
// `model`: the model the call named ("": the default model), counted under its name when it is
// loaded; null for calls that name none.
grpc::Status Finish(grpc::ServerContext* context, const Admission& admission,
                    absl::string_view what, const absl::Status& status, bool answered,
                    const std::string* model = nullptr) {
  LogOutcome(admission.request_id, what, status);
  if (admission.metrics != nullptr) {
    std::string loaded;
    if (admission.models != nullptr && model != nullptr) {
      if (auto found = admission.models->Find(*model); found.ok()) loaded = (*found)->name();
    }
    admission.metrics->CountCall(admission.method, loaded, status.code());
  }
  EchoRequestId(context, admission, answered);
  AddRetryAdvice(status, context);
  return ForCaller(status, admission.request_id);
}

// Tags a stream's error with the micro-batch it happened in, keeping its payloads.
absl::Status InMicroBatch(const absl::Status& status, int64_t index) {
  absl::Status numbered(status.code(),
                        absl::StrCat(status.message(), " (micro-batch ", index, ")"));
  status.ForEachPayload([&numbered](absl::string_view url, const absl::Cord& payload) {
    numbered.SetPayload(url, payload);
  });
  return numbered;
}

}  // namespace

LMHeadServiceImpl::LMHeadServiceImpl(const Options& options, Scheduler* scheduler,
                                     RegionRegistry* regions,
                                     std::shared_ptr<const BearerTokens> tokens)
    : options_(options),
      scheduler_(scheduler),
      regions_(regions),
      tokens_(std::move(tokens)),
      open_streams_(options.max_open_streams),
      shared_memory_sessions_(options.max_shared_memory_sessions) {
  // lmhead.v1.LMHeadService's methods, as the generated service registers them, with
  // ReceivedForwardRequest for the forwards' requests. Unary responses are serialised through
  // MessageLite, as generated handlers do (proto/strict_parsing.h).
  using grpc::internal::BidiStreamingHandler;
  using grpc::internal::RpcMethod;
  using grpc::internal::RpcMethodHandler;
  using grpc::internal::RpcServiceMethod;
  using Self = LMHeadServiceImpl;
  using Lite = grpc::protobuf::MessageLite;
  AddMethod(new RpcServiceMethod(
      kForwardMethod, RpcMethod::NORMAL_RPC,
      new RpcMethodHandler<Self, ReceivedForwardRequest, v1::ForwardResponse,
                           ReceivedForwardRequest, Lite>(std::mem_fn(&Self::Forward), this)));
  AddMethod(new RpcServiceMethod(
      kForwardStreamMethod, RpcMethod::BIDI_STREAMING,
      new BidiStreamingHandler<Self, ReceivedForwardRequest, v1::ForwardResponse>(
          std::mem_fn(&Self::ForwardStream), this)));
  AddMethod(new RpcServiceMethod(
      kListModelsMethod, RpcMethod::NORMAL_RPC,
      new RpcMethodHandler<Self, v1::ListModelsRequest, v1::ListModelsResponse, Lite, Lite>(
          std::mem_fn(&Self::ListModels), this)));
  AddMethod(new RpcServiceMethod(
      kGetModelMethod, RpcMethod::NORMAL_RPC,
      new RpcMethodHandler<Self, v1::GetModelRequest, v1::ModelInfo, Lite, Lite>(
          std::mem_fn(&Self::GetModel), this)));
  AddMethod(new RpcServiceMethod(
      kSharedMemoryMethod, RpcMethod::BIDI_STREAMING,
      new BidiStreamingHandler<Self, v1::SharedMemoryRequest, v1::SharedMemoryResponse>(
          std::mem_fn(&Self::SharedMemory), this)));
}

LMHeadServiceImpl::~LMHeadServiceImpl() = default;

void LMHeadServiceImpl::SetRegistry(std::shared_ptr<const ModelRegistry> registry) {
  std::atomic_store(&registry_, std::move(registry));
}

std::shared_ptr<const ModelRegistry> LMHeadServiceImpl::registry() const {
  return std::atomic_load(&registry_);
}

bool LMHeadServiceImpl::WaitIdle(std::chrono::system_clock::time_point deadline) const {
  while (running_calls_.load() > 0) {
    if (std::chrono::system_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

namespace {

// The call's bearer token, checked first: a caller without one learns nothing of the server's
// state.
bool Authenticated(const grpc::ServerContext& context, const BearerTokens* tokens) {
  if (tokens == nullptr) return true;
  const auto& metadata = context.client_metadata();
  const auto header = metadata.find("authorization");
  return header != metadata.end() &&
         tokens->Accepts(absl::string_view(header->second.data(), header->second.size()));
}

Admission Admit(const grpc::ServerContext& context, absl::string_view method, Metrics* metrics,
                const BearerTokens* tokens, const std::shared_ptr<const ModelRegistry>& models,
                bool forward, bool draining) {
  Admission admission;
  admission.request_id = RequestIdOf(context);
  admission.traceparent = std::string(ValidTraceparent(Header(context, "traceparent")));
  admission.method = std::string(method);
  admission.metrics = metrics;
  admission.models = models;
  if (!Authenticated(context, tokens)) {
    admission.status = absl::UnauthenticatedError(
        "this server needs a bearer token: call metadata 'authorization: Bearer TOKEN' with one "
        "of the tokens it was given (docs/API.md \"Authentication\")");
  } else if (forward && draining) {
    admission.status = absl::UnavailableError("the server is shutting down");
  } else if (models == nullptr) {
    admission.status = absl::UnavailableError("the server is still loading its models");
  } else if (forward) {
    admission.status = CheckStillWanted(context);
  }
  return admission;
}

// Counts a Forward or ForwardStream call as running for as long as it lives.
class RunningCall {
 public:
  explicit RunningCall(std::atomic<int>* running) : running_(running) { ++*running_; }
  ~RunningCall() { --*running_; }
  RunningCall(const RunningCall&) = delete;
  RunningCall& operator=(const RunningCall&) = delete;

 private:
  std::atomic<int>* running_;
};

}  // namespace

grpc::Status LMHeadServiceImpl::Forward(grpc::ServerContext* context,
                                        const ReceivedForwardRequest* received,
                                        v1::ForwardResponse* response) {
  const v1::ForwardRequest* request = &received->message();
  const RunningCall running(&running_calls_);
  const Admission admission =
      Admit(*context, "Forward", metrics_, tokens_.get(), registry(), /*forward=*/true, draining_);
  absl::Status status = admission.status;
  if (status.ok()) {
    status = CatchTorchErrors([&]() -> absl::Status {
      const SharedMemoryAccess shared_memory{regions_, regions_ != nullptr ? context->peer() : ""};
      absl::StatusOr<Call> call =
          Decode(*admission.models, options_, shared_memory, *context, nullptr, *received);
      if (!call.ok()) return call.status();
      if (absl::Status queued = scheduler_->Submit(call->job); !queued.ok()) return queued;
      return Encode(*call, AwaitJob(*scheduler_, *call->job), response, metrics_);
    });
  }
  if (status.ok()) {
    nonfinite_inputs_ += response->num_nonfinite_inputs();
    if (response->num_nonfinite_inputs() > 0) {
      LogWarning(admission.request_id,
                 absl::StrCat(response->num_nonfinite_inputs(),
                              " non-finite hidden-state values (propagated)"));
    }
  }
  return Finish(
      context, admission,
      absl::StrCat("Forward model=", CallerText(request->model()),
                   status.ok() ? absl::StrCat(" total_us=", response->timings().total_us(),
                                              " batch_size=", response->timings().batch_size())
                               : ""),
      status, status.ok(), &request->model());
}

grpc::Status LMHeadServiceImpl::ForwardStream(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::ForwardResponse, ReceivedForwardRequest>* stream) {
  const RunningCall running(&running_calls_);
  const Admission admission = Admit(*context, "ForwardStream", metrics_, tokens_.get(), registry(),
                                    /*forward=*/true, draining_);
  if (!admission.status.ok()) {
    return Finish(context, admission, "ForwardStream", admission.status, /*answered=*/false);
  }
  ConcurrencyLimiter::Slot slot = open_streams_.TryAcquire();
  if (!slot) {
    return Finish(context, admission, "ForwardStream",
                  absl::ResourceExhaustedError(
                      absl::StrCat("too many open streams: ", open_streams_.max_in_use(),
                                   " (--max_open_streams); retry later")),
                  /*answered=*/false);
  }
  const ModelRegistry& models = *admission.models;
  const SharedMemoryAccess shared_memory{regions_, regions_ != nullptr ? context->peer() : ""};
  // Each micro-batch is a job in the queue like any unary call. With --stream_read_ahead the next
  // one is read, decoded and queued while the current one runs (two held at most); without, one
  // at a time on this thread. Only the first may be refused for a full queue: later ones wait
  // for room, since the stream was admitted.
  int64_t submitted = 0;
  std::atomic<bool> ending{false};
  using Queued = absl::StatusOr<Call>;
  const auto read_and_queue = [&]() -> std::optional<Queued> {
    auto request = std::make_shared<ReceivedForwardRequest>();
    if (!stream->Read(request.get())) {
      if (!request->parse_failed()) return std::nullopt;  // the client's end of the stream
      return Queued(absl::InvalidArgumentError(
          "request: not a valid lmhead.v1.ForwardRequest message (the protobuf wire format could "
          "not be parsed)"));
    }
    return CatchTorchErrors([&]() -> Queued {
      const ReceivedForwardRequest& received = *request;
      absl::StatusOr<Call> call =
          Decode(models, options_, shared_memory, *context, std::move(request), received, &ending);
      if (!call.ok()) return call.status();
      if (absl::Status queued = scheduler_->Submit(call->job, /*wait_for_room=*/submitted > 0);
          !queued.ok()) {
        return queued;
      }
      ++submitted;
      return call;
    });
  };
  std::optional<ReadAhead<Queued>> read_ahead;
  if (options_.stream_read_ahead) {
    read_ahead.emplace(read_and_queue, [](const Queued& call) { return !call.ok(); });
  }
  v1::ForwardResponse response;
  int64_t index = 0;
  int64_t nonfinite = 0;
  absl::Status status;
  while (true) {
    if (status = CheckStillWanted(*context); !status.ok()) break;
    std::optional<Queued> call = read_ahead ? read_ahead->Next() : read_and_queue();
    if (!call.has_value()) break;
    status = call->ok() ? CatchTorchErrors([&]() {
      return Encode(**call, AwaitJob(*scheduler_, *(*call)->job), &response, metrics_);
    })
                        : call->status();
    if (!status.ok()) {
      status = InMicroBatch(status, index);
      break;
    }
    nonfinite += response.num_nonfinite_inputs();
    LogDebug(admission.request_id,
             absl::StrCat("micro-batch ", index, " total_us=", response.timings().total_us()));
    if (index == 0) EchoRequestId(context, admission, /*headers=*/true);
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
  if (read_ahead) {
    ending = true;  // a micro-batch waiting for room in the queue gives up at once
    if (!read_ahead->Stop(std::chrono::seconds(1))) context->TryCancel();
    // A micro-batch read ahead and queued but not answered: withdrawn, or waited for (it aliases
    // its request, which the read-ahead owns).
    if (std::optional<Queued> pending = read_ahead->Next(); pending.has_value() && pending->ok()) {
      Job& job = *(*pending)->job;
      if (!scheduler_->Withdraw(job)) job.done.WaitForNotification();
    }
  }
  if (status.ok() && context->IsCancelled()) {
    status = absl::CancelledError("the client cancelled the stream");
  }
  nonfinite_inputs_ += nonfinite;
  if (nonfinite > 0) {
    LogWarning(admission.request_id,
               absl::StrCat(nonfinite, " non-finite hidden-state values (propagated)"));
  }
  return Finish(
      context, admission,
      absl::StrCat("ForwardStream ", index, index == 1 ? " micro-batch" : " micro-batches"), status,
      index > 0);
}

grpc::Status LMHeadServiceImpl::ListModels(grpc::ServerContext* context,
                                           const v1::ListModelsRequest* /*request*/,
                                           v1::ListModelsResponse* response) {
  const Admission admission = Admit(*context, "ListModels", metrics_, tokens_.get(), registry(),
                                    /*forward=*/false, draining_);
  if (admission.status.ok()) {
    for (const auto& model : admission.models->List()) {
      *response->add_models() = ModelInfoToWire(*model, options_.expose_model_paths);
    }
    if (admission.models->Find("").ok()) {
      response->set_default_model(admission.models->default_model());
    }
  }
  return Finish(context, admission, "ListModels", admission.status, admission.status.ok());
}

grpc::Status LMHeadServiceImpl::GetModel(grpc::ServerContext* context,
                                         const v1::GetModelRequest* request,
                                         v1::ModelInfo* response) {
  const Admission admission = Admit(*context, "GetModel", metrics_, tokens_.get(), registry(),
                                    /*forward=*/false, draining_);
  absl::Status status = admission.status;
  if (status.ok()) {
    if (absl::StatusOr<std::shared_ptr<const Model>> model =
            admission.models->Find(request->name());
        model.ok()) {
      *response = ModelInfoToWire(**model, options_.expose_model_paths);
    } else {
      // The registry names ForwardRequest's field, `model`; here the field is `name`.
      status = absl::Status(model.status().code(),
                            absl::StrCat("name", model.status().message().substr(5)));
    }
  }
  return Finish(context, admission, absl::StrCat("GetModel name=", CallerText(request->name())),
                status, status.ok(), &request->name());
}

namespace {

// Answers one request of a SharedMemory session.
v1::SharedMemoryResponse HandleSharedMemoryRequest(RegionRegistry::Session& session,
                                                   const v1::SharedMemoryRequest& request) {
  absl::StatusOr<std::string> region;
  switch (request.action_case()) {
    case v1::SharedMemoryRequest::kRegisterSystem: {
      const v1::RegisterSystemSharedMemory& system = request.register_system();
      region = session.RegisterSystem(system.key(), system.offset(), system.byte_size());
      break;
    }
    case v1::SharedMemoryRequest::kRegisterCuda: {
      const v1::RegisterCudaSharedMemory& cuda = request.register_cuda();
      region = session.RegisterCuda(cuda.raw_handle(), cuda.device_id(), cuda.byte_size());
      break;
    }
    case v1::SharedMemoryRequest::kUnregister:
      if (absl::Status status = session.Unregister(request.unregister()); status.ok()) {
        region = request.unregister();
      } else {
        region = status;
      }
      break;
    default:
      region = absl::InvalidArgumentError(
          "action: expected one of register_system, register_cuda or unregister");
  }
  v1::SharedMemoryResponse response;
  if (region.ok()) {
    response.set_region(*region);
  } else {
    response.set_code(static_cast<int>(region.status().code()));
    response.set_message(std::string(region.status().message()));
  }
  return response;
}

// A region id in a log line: its first 8 digits (the id is what lets a client use the region).
std::string LoggedRegion(absl::string_view id) {
  return absl::StrCat(CallerText(id.substr(0, 8)), "...");
}

}  // namespace

grpc::Status LMHeadServiceImpl::SharedMemory(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::SharedMemoryResponse, v1::SharedMemoryRequest>* stream) {
  const Admission admission = Admit(*context, "SharedMemory", metrics_, tokens_.get(), registry(),
                                    /*forward=*/true, draining_);
  const auto refuse = [&](const absl::Status& status) {
    return Finish(context, admission, "SharedMemory", status, /*answered=*/false);
  };
  if (!admission.status.ok()) return refuse(admission.status);
  if (regions_ == nullptr) {
    return refuse(absl::FailedPreconditionError(
        "shared memory is off on this server (--allow_shared_memory)"));
  }
  const std::string peer = context->peer();
  if (!IsLocalPeer(peer)) {
    return refuse(absl::PermissionDeniedError(
        absl::StrCat("shared memory is only for clients on the server's host (loopback or a Unix "
                     "socket); this call came from ",
                     CallerText(peer))));
  }
  ConcurrencyLimiter::Slot slot = shared_memory_sessions_.TryAcquire();
  if (!slot) {
    return refuse(absl::ResourceExhaustedError(
        absl::StrCat("too many shared memory sessions: ", shared_memory_sessions_.max_in_use(),
                     " (--max_shared_memory_sessions); retry later")));
  }
  // Every region the session registers is unregistered when `session` goes, however the call
  // ends: the client's half-close, cancellation, a lost connection, the deadline, or shutdown
  // (each ends Read below).
  std::unique_ptr<RegionRegistry::Session> session = regions_->OpenSession(peer);
  int64_t answered = 0;
  absl::Status status;
  v1::SharedMemoryRequest request;
  while (true) {
    TakeRequestParseFailure();
    if (!stream->Read(&request)) {
      if (TakeRequestParseFailure()) {
        status = absl::InvalidArgumentError(
            "request: not a valid lmhead.v1.SharedMemoryRequest message (the protobuf wire "
            "format could not be parsed)");
      }
      break;
    }
    const v1::SharedMemoryResponse response = HandleSharedMemoryRequest(*session, request);
    if (response.code() != 0) {
      LogWarning(admission.request_id,
                 absl::StrCat("SharedMemory request ", answered, " failed: ", response.message()));
    } else if (request.has_unregister()) {
      LogInfo(admission.request_id,
              absl::StrCat("unregistered shared memory region ", LoggedRegion(response.region())));
    } else {
      LogInfo(admission.request_id,
              absl::StrCat(
                  "registered shared memory region ", LoggedRegion(response.region()),
                  request.has_register_system()
                      ? absl::StrCat(" (", request.register_system().byte_size(), " bytes of ",
                                     CallerText(request.register_system().key()), ")")
                      : absl::StrCat(" (", request.register_cuda().byte_size(),
                                     " bytes on cuda:", request.register_cuda().device_id(), ")")));
    }
    if (answered == 0) EchoRequestId(context, admission, /*headers=*/true);
    ++answered;
    if (!stream->Write(response)) {
      status = absl::CancelledError("the client went away");
      break;
    }
  }
  if (status.ok() && context->IsCancelled()) {
    status = absl::CancelledError("the client cancelled the session");
  }
  const int held = session->regions();
  session.reset();
  return Finish(context, admission,
                absl::StrCat("SharedMemory session of ", answered,
                             answered == 1 ? " request, " : " requests, ", held,
                             held == 1 ? " region" : " regions", " unregistered at its end"),
                status, answered > 0);
}

// ---- ModelAdminService.

ModelAdminServiceImpl::ModelAdminServiceImpl(const Options& options, LMHeadServiceImpl* models,
                                             std::shared_ptr<const BearerTokens> admin_tokens)
    : options_(options), models_(models), admin_tokens_(std::move(admin_tokens)) {}

namespace {

// Admit for a ModelAdminService call: off without admin tokens, and only with one of them.
Admission AdmitAdmin(const grpc::ServerContext& context, absl::string_view method, Metrics* metrics,
                     const BearerTokens* admin_tokens, const LMHeadServiceImpl& models) {
  Admission admission = Admit(context, method, metrics, admin_tokens, models.registry(),
                              /*forward=*/false, models.draining());
  if (admin_tokens == nullptr) {
    admission.status = absl::FailedPreconditionError(
        "model administration is off on this server (it needs --admin_token_file)");
  } else if (absl::IsUnauthenticated(admission.status)) {
    admission.status = absl::UnauthenticatedError(
        "model administration needs an administrator's bearer token: call metadata "
        "'authorization: Bearer TOKEN' with a token of the server's --admin_token_file");
  } else if (admission.status.ok() && models.draining()) {
    admission.status = absl::UnavailableError("the server is shutting down");
  }
  return admission;
}

}  // namespace

absl::Status ModelAdminServiceImpl::Load(const v1::LoadModelRequest& request,
                                         absl::string_view request_id, v1::ModelInfo* info) {
  if (!IsModelName(request.name())) {
    return absl::InvalidArgumentError(absl::StrCat("name: expected 1 to ", kMaxModelNameBytes,
                                                   " characters of [A-Za-z0-9._-], got ",
                                                   CallerText(request.name())));
  }
  if (options_.model_repository.empty()) {
    return absl::FailedPreconditionError(
        "path: this server has no model repository (--model_repository), the only place "
        "LoadModel reads weights from");
  }
  absl::StatusOr<std::string> file = ResolveInRepository(options_.model_repository, request.path());
  if (!file.ok()) return file.status();

  absl::MutexLock lock(&change_mu_);
  const std::shared_ptr<const ModelRegistry> current = models_->registry();
  absl::StatusOr<std::shared_ptr<const Model>> loaded = current->Find(request.name());
  if (loaded.ok() && !request.replace()) {
    return absl::AlreadyExistsError(absl::StrCat(
        "name: a model named ", CallerText(request.name()), " is loaded already (version ",
        (*loaded)->version(), "); set replace to replace it"));
  }
  absl::StatusOr<std::unique_ptr<Model>> model =
      Model::Load(ModelSpec{request.name(), *file}, options_.head_config_json, current->devices(),
                  options_.max_config_variants);
  if (!model.ok()) {
    // The repository's location on the host stays the operator's business.
    std::error_code error;
    const std::string root =
        std::filesystem::canonical(options_.model_repository, error).string() + "/";
    // The same file would fail the same way: clients are told not to retry.
    return NotRetryable(absl::Status(model.status().code(),
                                     absl::StrReplaceAll(model.status().message(), {{root, ""}})));
  }
  *info = ModelInfoToWire(**model, options_.expose_model_paths);
  LogInfo(request_id,
          absl::StrCat("model '", request.name(), "' version ", (*model)->version(), " from ",
                       (*model)->source(),
                       loaded.ok() ? absl::StrCat(" replaces version ", (*loaded)->version())
                                   : std::string(" loaded")));
  models_->SetRegistry(current->With(std::shared_ptr<const Model>(*std::move(model))));
  return absl::OkStatus();
}

absl::Status ModelAdminServiceImpl::Unload(const v1::UnloadModelRequest& request,
                                           absl::string_view request_id) {
  if (request.name().empty()) {
    return absl::InvalidArgumentError("name: expected the name of a loaded model");
  }
  absl::MutexLock lock(&change_mu_);
  const std::shared_ptr<const ModelRegistry> current = models_->registry();
  absl::StatusOr<std::shared_ptr<const Model>> loaded = current->Find(request.name());
  if (!loaded.ok()) {
    return absl::NotFoundError(absl::StrCat("name: no model named ", CallerText(request.name()),
                                            " (ListModels lists this server's models)"));
  }
  models_->SetRegistry(current->Without(request.name()));
  LogInfo(request_id, absl::StrCat("model '", request.name(), "' version ", (*loaded)->version(),
                                   " unloaded (calls already admitted on it finish)"));
  return absl::OkStatus();
}

grpc::Status ModelAdminServiceImpl::LoadModel(grpc::ServerContext* context,
                                              const v1::LoadModelRequest* request,
                                              v1::ModelInfo* response) {
  const Admission admission =
      AdmitAdmin(*context, "LoadModel", metrics_, admin_tokens_.get(), *models_);
  absl::Status status = admission.status;
  if (status.ok()) status = Load(*request, admission.request_id, response);
  return Finish(context, admission,
                absl::StrCat("LoadModel name=", CallerText(request->name()),
                             " path=", CallerText(request->path())),
                status, status.ok());
}

grpc::Status ModelAdminServiceImpl::UnloadModel(grpc::ServerContext* context,
                                                const v1::UnloadModelRequest* request,
                                                v1::UnloadModelResponse* /*response*/) {
  const Admission admission =
      AdmitAdmin(*context, "UnloadModel", metrics_, admin_tokens_.get(), *models_);
  absl::Status status = admission.status;
  if (status.ok()) status = Unload(*request, admission.request_id);
  return Finish(context, admission, absl::StrCat("UnloadModel name=", CallerText(request->name())),
                status, status.ok());
}

}  // namespace lmhead
