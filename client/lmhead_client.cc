#include "client/lmhead_client.h"

#include <arpa/inet.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/impl/client_unary_call.h>
#include <grpcpp/impl/rpc_method.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/channel_arguments.h>
#include <grpcpp/support/sync_stream.h>
#include <netinet/in.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/micro_batches.h"
#include "client/tensor_view.h"
#include "client/wire_request.h"
#include "proto/wire_dtype.h"

namespace lmhead {
absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

// ForwardArgs::fused_chunk_bytes is deprecated; these are the only places that touch it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
ForwardArgs::ForwardArgs() = default;
ForwardArgs::ForwardArgs(const ForwardArgs&) = default;
ForwardArgs::ForwardArgs(ForwardArgs&&) = default;
ForwardArgs& ForwardArgs::operator=(const ForwardArgs&) = default;
ForwardArgs& ForwardArgs::operator=(ForwardArgs&&) = default;
ForwardArgs::~ForwardArgs() = default;

namespace {

// The request for `args` without hidden states and labels.
v1::ForwardRequest RequestWithoutInputs(const ForwardArgs& args) {
  v1::ForwardRequest request;
  request.set_model(args.model);
  if (args.loss_implementation != v1::LOSS_IMPLEMENTATION_UNSPECIFIED) {
    request.mutable_config()->set_loss_implementation(args.loss_implementation);
  }
  if (args.compute_dtype != v1::DATA_TYPE_UNSPECIFIED) {
    request.mutable_config()->set_dtype(args.compute_dtype);
  }
  v1::ForwardOptions* options = request.mutable_options();
  if (args.ignore_index.has_value()) options->set_ignore_index(*args.ignore_index);
  options->set_loss_reduction(args.loss_reduction);
  if (args.z_loss_multiplier.has_value()) options->set_z_loss_multiplier(*args.z_loss_multiplier);
  if (const auto* value = std::get_if<double>(&args.loss_div_factor)) {
    options->set_loss_div_factor_value(*value);
  } else if (const auto* tensor = std::get_if<v1::Tensor>(&args.loss_div_factor)) {
    *options->mutable_loss_div_factor_tensor() = *tensor;
  }
  if (args.return_logits.has_value()) options->set_return_logits(*args.return_logits);
  if (const auto* count = std::get_if<int64_t>(&args.logits_to_keep)) {
    if (*count != 0) options->set_logits_to_keep_count(*count);
  } else {
    *options->mutable_logits_to_keep_positions() = std::get<v1::Tensor>(args.logits_to_keep);
  }
  options->set_logits_dtype(args.logits_dtype);
  if (args.logit_tile_bytes.has_value()) options->set_logit_tile_bytes(*args.logit_tile_bytes);
  // The deprecated name goes out as the deprecated field: the server takes it, or refuses both
  // when they disagree.
  if (args.fused_chunk_bytes.has_value()) options->set_fused_chunk_bytes(*args.fused_chunk_bytes);
  options->set_return_argmax(args.return_argmax);
  if (args.scoring.any()) {
    v1::ScoringOptions* scoring = options->mutable_scoring();
    scoring->set_label_logprobs(args.scoring.label_logprobs);
    scoring->set_entropy(args.scoring.entropy);
    scoring->set_label_rank(args.scoring.label_rank);
    scoring->set_top_k(args.scoring.top_k);
    if (args.scoring.candidate_ids.has_value()) {
      *scoring->mutable_candidate_ids() = *args.scoring.candidate_ids;
    }
    if (args.scoring.segment_ids.has_value()) {
      *scoring->mutable_segment_ids() = *args.scoring.segment_ids;
    }
  }
  return request;
}
#pragma GCC diagnostic pop

// The labels of a call given `labels` as a view and `args`: the view, or a view of args.labels;
// INVALID_ARGUMENT when both are given.
absl::StatusOr<std::optional<TensorView>> LabelsOf(const std::optional<TensorView>& labels,
                                                   const ForwardArgs& args) {
  if (labels.has_value() && args.labels.has_value()) {
    return absl::InvalidArgumentError(
        "labels: given both as a view and in ForwardArgs.labels; pass one");
  }
  if (labels.has_value()) return labels;
  if (args.labels.has_value()) return ViewOf(*args.labels);
  return std::nullopt;
}

}  // namespace

v1::ForwardRequest MakeForwardRequest(const v1::Tensor& hidden_states, const ForwardArgs& args) {
  v1::ForwardRequest request = RequestWithoutInputs(args);
  *request.mutable_hidden_states() = hidden_states;
  if (args.labels.has_value()) *request.mutable_labels() = *args.labels;
  return request;
}

namespace {

// Retry settings shared by gRPC's policy (unary calls) and ForwardStreamOn (streams).
constexpr int kMaxAttempts = 5;  // gRPC's limit
constexpr absl::Duration kInitialBackoff = absl::Milliseconds(100);
constexpr absl::Duration kMaxBackoff = absl::Seconds(5);
constexpr int kBackoffMultiplier = 2;
constexpr int64_t kRetryBufferBytes = int64_t{256} << 20;  // sent messages kept for a retry

// The methods called with requests serialised by SerializeForwardRequest, not the stub's.
constexpr char kForwardPath[] = "/lmhead.v1.LMHeadService/Forward";
constexpr char kForwardStreamPath[] = "/lmhead.v1.LMHeadService/ForwardStream";

}  // namespace

std::string RetryServiceConfig(int max_attempts, bool round_robin) {
  const std::string balancing =
      round_robin ? R"("loadBalancingConfig": [{"round_robin": {}}])" : "";
  if (max_attempts <= 1) return balancing.empty() ? "" : absl::StrCat("{", balancing, "}");
  // The most specific name wins (gRFC A6): ForwardStream gets no policy; ForwardStreamOn
  // retries it (docs/API.md "Retries").
  return absl::StrCat("{", balancing, balancing.empty() ? "" : ", ",
                      R"("methodConfig": [{"name": [{"service": "lmhead.v1.LMHeadService"}], )",
                      R"("retryPolicy": {"maxAttempts": )", std::min(max_attempts, kMaxAttempts),
                      R"(, "initialBackoff": "0.1s", "maxBackoff": "5s", "backoffMultiplier": 2, )",
                      R"("retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]}}, )",
                      R"({"name": [{"service": "lmhead.v1.LMHeadService", )",
                      R"("method": "ForwardStream"}]}]})");
}

void StreamCancellation::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  if (context_ != nullptr) context_->TryCancel();
}

bool StreamCancellation::Attach(grpc::ClientContext* context) {
  absl::MutexLock lock(&mu_);
  if (cancelled_) return false;
  context_ = context;
  return true;
}

void StreamCancellation::Detach() {
  absl::MutexLock lock(&mu_);
  context_ = nullptr;
}

bool StreamCancellation::WaitForCancel(absl::Duration delay) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&cancelled_), delay);
  return cancelled_;
}

absl::StatusOr<ChannelTarget> ChannelTargetOf(absl::string_view address) {
  const absl::string_view trimmed = absl::StripAsciiWhitespace(address);
  // A target with a scheme gRPC knows, as it is ("localhost:50051" has none: a host and port).
  for (const absl::string_view scheme : {"dns:", "ipv4:", "ipv6:"}) {
    if (absl::StartsWithIgnoreCase(trimmed, scheme))
      return ChannelTarget{std::string(trimmed), true};
  }
  for (const absl::string_view scheme : {"unix:", "unix-abstract:", "vsock:", "xds:"}) {
    if (absl::StartsWithIgnoreCase(trimmed, scheme))
      return ChannelTarget{std::string(trimmed), false};
  }
  std::vector<absl::string_view> entries = absl::StrSplit(trimmed, ',');
  for (absl::string_view& entry : entries) entry = absl::StripAsciiWhitespace(entry);
  if (std::find(entries.begin(), entries.end(), "") != entries.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "address: expected HOST:PORT, several IP:PORT separated by commas, or a gRPC target such "
        "as dns:///NAME:PORT; got '",
        address, "'"));
  }
  if (entries.size() == 1) return ChannelTarget{std::string(entries[0]), false};
  int family = 0;
  for (const absl::string_view entry : entries) {
    // IPv4 "A.B.C.D:PORT" or IPv6 "[ADDRESS]:PORT".
    const size_t colon = entry.rfind(':');
    absl::string_view host = entry.substr(0, colon == absl::string_view::npos ? 0 : colon);
    const bool bracketed = absl::StartsWith(host, "[") && absl::EndsWith(host, "]");
    if (bracketed) host = host.substr(1, host.size() - 2);
    const std::string host_text(host);
    unsigned char bytes[sizeof(in6_addr)];
    const int entry_family = bracketed ? AF_INET6 : AF_INET;
    int port = 0;
    if (colon == absl::string_view::npos ||
        inet_pton(entry_family, host_text.c_str(), bytes) != 1 ||
        !absl::SimpleAtoi(entry.substr(colon + 1), &port) || port < 1 || port > 65535) {
      return absl::InvalidArgumentError(absl::StrCat(
          "address: '", entry,
          "' in a list of several addresses must be IP:PORT (an IPv4 address, or an IPv6 one in "
          "brackets, and a port): gRPC resolves one name per channel; for host names give one "
          "dns:///NAME:PORT whose DNS records list every replica"));
    }
    if (family != 0 && family != entry_family) {
      return absl::InvalidArgumentError(
          absl::StrCat("address: '", address,
                       "' mixes IPv4 and IPv6 addresses; a channel takes a list of one family "
                       "(ipv4: or ipv6: targets)"));
    }
    family = entry_family;
  }
  return ChannelTarget{
      absl::StrCat(family == AF_INET ? "ipv4:" : "ipv6:", absl::StrJoin(entries, ",")), true};
}

std::unique_ptr<LMHeadClient> LMHeadClient::Connect(const std::string& address,
                                                    ClientOptions options) {
  absl::StatusOr<ChannelTarget> parsed = ChannelTargetOf(address);
  const ChannelTarget target = parsed.ok() ? *std::move(parsed) : ChannelTarget{address, false};
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(INT_MAX);
  arguments.SetMaxSendMessageSize(INT_MAX);
  if (const std::string config = RetryServiceConfig(options.max_attempts, target.replicas);
      !config.empty()) {
    arguments.SetServiceConfigJSON(config);
  }
  if (options.max_attempts > 1) {
    // gRPC keeps a call's sent messages for a retry up to this size (default 256 KiB).
    arguments.SetInt(GRPC_ARG_PER_RPC_RETRY_BUFFER_SIZE, 256 << 20);
  } else {
    arguments.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  }
  if (options.own_connection) arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls || !options.tls_root_certs.empty() || !options.tls_cert_chain.empty() ||
      !options.tls_private_key.empty() || !options.tls_server_name.empty()) {
    grpc::SslCredentialsOptions tls;
    tls.pem_root_certs = options.tls_root_certs;
    tls.pem_cert_chain = options.tls_cert_chain;
    tls.pem_private_key = options.tls_private_key;
    credentials = grpc::SslCredentials(tls);
    // The certificate is checked against the channel's authority, which for an ipv4: or ipv6:
    // list would be the whole list: its first address instead.
    std::string authority = options.tls_server_name;
    if (authority.empty() && (absl::StartsWithIgnoreCase(target.target, "ipv4:") ||
                              absl::StartsWithIgnoreCase(target.target, "ipv6:"))) {
      const absl::string_view list = absl::string_view(target.target).substr(5);
      authority = std::string(list.substr(0, list.find(',')));
    }
    if (!authority.empty()) arguments.SetString(GRPC_ARG_DEFAULT_AUTHORITY, authority);
  }
  // gRPC 1.51's round_robin starts at the list's first address: each process starts at a
  // random one, so that many short-lived clients (one CLI call each) spread over the replicas.
  std::string channel_target = target.target;
  if (absl::StartsWithIgnoreCase(channel_target, "ipv4:") ||
      absl::StartsWithIgnoreCase(channel_target, "ipv6:")) {
    std::vector<std::string> list = absl::StrSplit(channel_target.substr(5), ',');
    absl::BitGen random;
    std::rotate(list.begin(), list.begin() + absl::Uniform<size_t>(random, 0, list.size()),
                list.end());
    channel_target = absl::StrCat(channel_target.substr(0, 5), absl::StrJoin(list, ","));
  }
  auto client = std::make_unique<LMHeadClient>(
      grpc::CreateCustomChannel(channel_target, credentials, arguments), std::move(options));
  client->open_channel_ = [address = channel_target, arguments, credentials]() mutable {
    grpc::ChannelArguments own = arguments;
    own.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // its own connection
    return grpc::CreateCustomChannel(address, credentials, own);
  };
  return client;
}

std::shared_ptr<grpc::Channel> LMHeadClient::StreamChannel(int index) {
  if (index == 0 || !open_channel_) return channel_;
  absl::MutexLock lock(&streams_mu_);
  while (static_cast<int>(stream_channels_.size()) < index) {
    stream_channels_.push_back(open_channel_());
  }
  return stream_channels_[index - 1];
}

LMHeadClient::LMHeadClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::LMHeadService::NewStub(channel_)),
      admin_(v1::ModelAdminService::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

void LMHeadClient::Prepare(grpc::ClientContext* context) const {
  if (options_.timeout.count() > 0) {
    context->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  }
  if (!options_.request_id.empty()) context->AddMetadata("x-request-id", options_.request_id);
  if (!options_.auth_token.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.auth_token));
  }
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::Forward(const v1::Tensor& hidden_states,
                                                          const ForwardArgs& args) {
  return Forward(MakeForwardRequest(hidden_states, args));
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::Forward(const TensorView& hidden_states,
                                                          const std::optional<TensorView>& labels,
                                                          const ForwardArgs& args) {
  absl::StatusOr<std::optional<TensorView>> label_view = LabelsOf(labels, args);
  if (!label_view.ok()) return label_view.status();
  v1::ForwardRequest request = RequestWithoutInputs(args);
  if (label_view->has_value()) CopyTensorTo(**label_view, request.mutable_labels());
  const grpc::ByteBuffer serialized = SerializeForwardRequest(std::move(request), hidden_states);
  grpc::ClientContext context;
  Prepare(&context);
  v1::ForwardResponse response;
  // As the generated stub calls Forward, with the request's bytes as they are.
  const grpc::Status status =
      grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, v1::ForwardResponse>(
          channel_.get(),
          grpc::internal::RpcMethod(kForwardPath, grpc::internal::RpcMethod::NORMAL_RPC), &context,
          serialized, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::Forward(const v1::ForwardRequest& request) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ForwardResponse response;
  const grpc::Status status = stub_->Forward(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

namespace {

// Whether a stream that ended with `status` before any answer may be tried again, and after how
// long: gRFC A6's rule (a retryable code; the server's grpc-retry-pushback-ms, where given,
// replaces the backoff, and a negative one means never), with its random backoff in
// [0, `*backoff`), `*backoff` growing for the next time.
std::optional<absl::Duration> RetryDelay(const grpc::Status& status,
                                         const grpc::ClientContext& context,
                                         absl::Duration* backoff) {
  if (status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED &&
      status.error_code() != grpc::StatusCode::UNAVAILABLE) {
    return std::nullopt;
  }
  const auto& trailers = context.GetServerTrailingMetadata();
  if (const auto pushback = trailers.find("grpc-retry-pushback-ms"); pushback != trailers.end()) {
    int64_t ms = 0;
    if (!absl::SimpleAtoi(absl::string_view(pushback->second.data(), pushback->second.size()),
                          &ms) ||
        ms < 0) {
      return std::nullopt;
    }
    return absl::Milliseconds(ms);
  }
  thread_local absl::BitGen random;
  const absl::Duration delay = *backoff * absl::Uniform(random, 0.0, 1.0);
  *backoff = std::min(*backoff * kBackoffMultiplier, kMaxBackoff);
  return delay;
}

// The bytes a request takes on the wire.
int64_t WireBytes(const v1::ForwardRequest& request) {
  return static_cast<int64_t>(request.ByteSizeLong());
}
int64_t WireBytes(const grpc::ByteBuffer& request) {
  return static_cast<int64_t>(request.Length());
}

// Opens ForwardStream calls on `channel` whose requests are already serialised
// (SerializeForwardRequest). gRPC's C++ API has no public synchronous call of raw bytes; this is
// how generated stubs open theirs.
auto OpenSerializedStream(std::shared_ptr<grpc::Channel> channel) {
  return [channel = std::move(channel)](grpc::ClientContext* context) {
    return std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, v1::ForwardResponse>>(
        grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, v1::ForwardResponse>::Create(
            channel.get(),
            grpc::internal::RpcMethod(kForwardStreamPath,
                                      grpc::internal::RpcMethod::BIDI_STREAMING),
            context));
  };
}

// Waits for `channel`'s connection (READY), asking it to connect, before an attempt of a stream.
// gRPC fails a call at once while its channel's last connection attempt has failed, and connects
// again only about 1 s later; an attempt that failed once for a passing reason (gRPC 1.51 can
// even report a connect() still under way as failed, docs/API.md "Retries") would otherwise cost
// the call its attempts within that second. Waits at most `*wait_left` (the call's, from
// kConnectionWait; what it waited is taken off) and not past `deadline`, so that a server that
// cannot be reached fails the call after one such wait. False when `cancelled` returns true
// first (asked every 50 ms).
bool AwaitConnection(grpc::Channel& channel, absl::Time deadline, absl::Duration* wait_left,
                     const std::function<bool()>& cancelled) {
  constexpr absl::Duration kPoll = absl::Milliseconds(50);
  const absl::Time start = absl::Now();
  const absl::Time give_up = std::min(deadline, start + *wait_left);
  bool connected_or_gave_up = true;
  for (grpc_connectivity_state state = channel.GetState(/*try_to_connect=*/true);
       state != GRPC_CHANNEL_READY && state != GRPC_CHANNEL_SHUTDOWN;
       state = channel.GetState(/*try_to_connect=*/true)) {
    const absl::Time now = absl::Now();
    if (now >= give_up) break;
    if (cancelled()) {
      connected_or_gave_up = false;
      break;
    }
    channel.WaitForStateChange(state, absl::ToChronoTime(std::min(give_up, now + kPoll)));
  }
  *wait_left = std::max(absl::ZeroDuration(), *wait_left - (absl::Now() - start));
  return connected_or_gave_up;
}

}  // namespace

template <class Request>
absl::Status LMHeadClient::ForwardStreamOn(grpc::Channel* channel, const OpenStream<Request>& open,
                                           const std::function<bool(Request*)>& next,
                                           const OnResponse& on_response,
                                           StreamCancellation* cancellation,
                                           const std::function<void(int64_t)>& rewind) {
  // gRPC 1.51's retry of a bidirectional stream was seen to lose the client's half-close or the
  // server's answer (docs/API.md "Retries"), so this client retries a refused stream itself:
  // before its first answer, resending what it had sent; after answers only with `rewind`, from
  // the first micro-batch not answered (an answered one is never sent again).
  const absl::Time deadline = options_.timeout.count() > 0
                                  ? absl::Now() + absl::FromChrono(options_.timeout)
                                  : absl::InfiniteFuture();
  std::deque<Request> sent;  // every micro-batch sent so far, while `replayable`
  int64_t sent_bytes = 0;
  bool replayable = true;
  bool exhausted = false;  // `next` returned false
  absl::Duration backoff = kInitialBackoff;
  int64_t index = 0;  // answers received, over every attempt
  // What is left of the call's waits for a connection (AwaitConnection).
  absl::Duration connection_wait_left = kConnectionWait;
  const std::function<bool()> cancelled = [cancellation]() {
    return cancellation != nullptr && cancellation->WaitForCancel(absl::ZeroDuration());
  };
  for (int attempt = 1;; ++attempt) {
    if (!AwaitConnection(*channel, deadline, &connection_wait_left, cancelled)) {
      return absl::CancelledError("the stream was cancelled");
    }
    grpc::ClientContext context;
    if (deadline != absl::InfiniteFuture()) context.set_deadline(absl::ToChronoTime(deadline));
    if (!options_.request_id.empty()) context.AddMetadata("x-request-id", options_.request_id);
    if (!options_.auth_token.empty()) {
      context.AddMetadata("authorization", absl::StrCat("Bearer ", options_.auth_token));
    }
    if (cancellation != nullptr && !cancellation->Attach(&context)) {
      return absl::CancelledError("the stream was cancelled");
    }
    std::unique_ptr<grpc::ClientReaderWriter<Request, v1::ForwardResponse>> stream = open(&context);
    std::atomic<bool> answered{false};
    // The writer owns `sent`, `sent_bytes`, `replayable` and `exhausted` until it is joined.
    std::thread writer([&]() {
      for (const Request& request : sent) {
        if (!stream->Write(request)) return;  // the call ended (error or cancellation)
      }
      Request request;
      while (!exhausted) {
        if (!next(&request)) {
          exhausted = true;
          break;
        }
        if (replayable && !answered) {
          sent_bytes += WireBytes(request);
          replayable = sent_bytes <= kRetryBufferBytes;
        }
        if (!replayable || answered) {
          sent.clear();
          if (!stream->Write(request)) return;
        } else {
          sent.push_back(std::move(request));
          if (!stream->Write(sent.back())) return;
        }
        request.Clear();
      }
      stream->WritesDone();
    });
    v1::ForwardResponse response;
    bool cancelled_here = false;
    while (stream->Read(&response)) {
      answered = true;
      if (!on_response(index++, response)) {
        context.TryCancel();
        cancelled_here = true;
        break;
      }
    }
    if (cancelled_here) {
      while (stream->Read(&response)) {
      }
    }
    writer.join();
    const grpc::Status status = stream->Finish();
    if (cancellation != nullptr) cancellation->Detach();
    // After answers, only a lost server (UNAVAILABLE) is worth another stream, and only where
    // `next` can start again from the first micro-batch not answered.
    const bool resume = answered && rewind && status.error_code() == grpc::StatusCode::UNAVAILABLE;
    if (status.ok() || (answered && !resume) || (!answered && !replayable) ||
        attempt >= options_.max_attempts) {
      return FromGrpcStatus(status);
    }
    const std::optional<absl::Duration> delay = RetryDelay(status, context, &backoff);
    if (!delay.has_value() || absl::Now() + *delay >= deadline) return FromGrpcStatus(status);
    if (cancellation != nullptr ? cancellation->WaitForCancel(*delay)
                                : (absl::SleepFor(*delay), false)) {
      return absl::CancelledError("the stream was cancelled");
    }
    if (resume) {  // what was sent is answered or lost with its server: from `index` on
      rewind(index);
      sent.clear();
      sent_bytes = 0;
      replayable = true;
      exhausted = false;
    }
  }
}

absl::Status LMHeadClient::ForwardStream(const NextRequest& next, const OnResponse& on_response,
                                         StreamCancellation* cancellation) {
  const OpenStream<v1::ForwardRequest> open = [this](grpc::ClientContext* context) {
    return stub_->ForwardStream(context);
  };
  return ForwardStreamOn(channel_.get(), open, next, on_response, cancellation);
}

namespace {

// `status` of a stream that started at micro-batch `first` of its job, its message's closing
// " (micro-batch N)" (the server's count within the stream) counted in the job.
absl::Status InJobMicroBatches(const absl::Status& status, int64_t first) {
  const absl::string_view message = status.message();
  constexpr absl::string_view kMark = " (micro-batch ";
  const size_t at = message.rfind(kMark);
  int64_t index = 0;
  if (at == absl::string_view::npos || !absl::EndsWith(message, ")") ||
      !absl::SimpleAtoi(message.substr(at + kMark.size(), message.size() - 1 - at - kMark.size()),
                        &index)) {
    return status;
  }
  return absl::Status(status.code(),
                      absl::StrCat(message.substr(0, at), kMark, first + index, ")"));
}

}  // namespace

absl::StatusOr<v1::ForwardResponse> LMHeadClient::ForwardMicroBatched(
    const v1::Tensor& hidden_states, const ForwardArgs& args, int64_t max_micro_batch_bytes,
    const std::function<void(int64_t, int64_t)>& progress, int parallel_streams) {
  return ForwardMicroBatched(ViewOf(hidden_states), std::nullopt, args, max_micro_batch_bytes,
                             progress, parallel_streams);
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::ForwardMicroBatched(
    const TensorView& hidden_states, const std::optional<TensorView>& labels,
    const ForwardArgs& args, int64_t max_micro_batch_bytes,
    const std::function<void(int64_t, int64_t)>& progress, int parallel_streams) {
  absl::StatusOr<std::optional<TensorView>> label_view = LabelsOf(labels, args);
  if (!label_view.ok()) return label_view.status();
  if (parallel_streams < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("parallel_streams: expected 1 or more, got ", parallel_streams));
  }
  if (hidden_states.shape.size() != 3) {
    return absl::InvalidArgumentError("hidden_states: expected (batch, seq_len, d_model)");
  }
  const int64_t batch = hidden_states.shape[0];
  const bool scalar_losses = args.loss_reduction != v1::LOSS_REDUCTION_NONE;
  // The arguments split with the batch (docs/API.md "Combining micro-batches").
  bool split_divisor = false;
  if (const auto* factor = std::get_if<v1::Tensor>(&args.loss_div_factor)) {
    if (scalar_losses) {
      return absl::InvalidArgumentError(
          "loss_div_factor: a tensor divisor cannot be applied to a mean or sum combined from "
          "micro-batches; pass it as a number");
    }
    if (factor->shape_size() > 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("loss_div_factor: a tensor divisor of rank ", factor->shape_size(),
                       " would change the losses' shape; expected rank 2 or less"));
    }
    split_divisor = factor->shape_size() == 2 && factor->shape(0) == batch && batch > 1;
  }
  // Per-row arguments with other rows than the job's would lose or lack rows once split.
  if (label_view->has_value() &&
      ((*label_view)->shape.size() != 2 || (*label_view)->shape[0] != batch)) {
    return absl::InvalidArgumentError(
        absl::StrCat("labels: expected (batch, seq_len) like hidden_states, split with the batch (",
                     batch, " rows); got shape [", absl::StrJoin((*label_view)->shape, ", "), "]"));
  }
  if (const auto* positions = std::get_if<v1::Tensor>(&args.logits_to_keep);
      positions != nullptr && (positions->shape_size() != 2 || positions->shape(0) != batch)) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits_to_keep: expected (batch, K) positions, split with the batch (", batch,
                     " rows); got shape [", absl::StrJoin(positions->shape(), ", "), "]"));
  }
  const std::optional<v1::Tensor>& segment_ids = args.scoring.segment_ids;
  if (segment_ids.has_value() &&
      (segment_ids->shape_size() != 2 || segment_ids->shape(0) != batch)) {
    return absl::InvalidArgumentError(
        absl::StrCat("segment_ids: expected (batch, seq_len) like labels, split with the batch (",
                     batch, " rows); got shape [", absl::StrJoin(segment_ids->shape(), ", "), "]"));
  }
  const std::optional<v1::Tensor>& candidate_ids = args.scoring.candidate_ids;
  const bool split_candidates = candidate_ids.has_value() && candidate_ids->shape_size() > 1;
  if (split_candidates && (candidate_ids->shape_size() != 3 || candidate_ids->shape(0) != batch)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "candidate_ids: expected (C,) or (batch, kept positions, C), split with the "
        "batch (",
        batch, " rows); got shape [", absl::StrJoin(candidate_ids->shape(), ", "), "]"));
  }
  const int64_t row_bytes =
      std::max<int64_t>(hidden_states.data.size() / std::max<int64_t>(batch, 1), 1);
  const int64_t rows_per_micro_batch = std::max<int64_t>(max_micro_batch_bytes / row_bytes, 1);
  const int64_t micro_batches =
      batch == 0 ? 1 : (batch + rows_per_micro_batch - 1) / rows_per_micro_batch;

  // Per micro-batch: the same options, but sums without the divisor for mean/sum; the tensors
  // split with the batch are set per micro-batch.
  v1::ForwardRequest base = RequestWithoutInputs(args);
  base.mutable_options()->clear_logits_to_keep();
  if (base.options().has_scoring()) {
    base.mutable_options()->mutable_scoring()->clear_segment_ids();
    if (split_candidates) base.mutable_options()->mutable_scoring()->clear_candidate_ids();
  }
  if (scalar_losses) {
    base.mutable_options()->set_loss_reduction(v1::LOSS_REDUCTION_SUM);
    base.mutable_options()->clear_loss_div_factor();
  } else if (split_divisor) {
    base.mutable_options()->clear_loss_div_factor();
  }

  // Micro-batch m's request, serialised for the wire with its rows of hidden states not copied
  // where the view has an owner (a mapped file: gRPC sends them from there), else copied once;
  // its labels (and the positions and divisor split with the batch) are copied into it.
  const auto micro_batch = [&](int64_t m, grpc::ByteBuffer* out) {
    const int64_t begin = std::min(m * rows_per_micro_batch, batch);
    const int64_t end = std::min(begin + rows_per_micro_batch, batch);
    v1::ForwardRequest request = base;
    if (label_view->has_value()) CopyRowsTo(**label_view, begin, end, request.mutable_labels());
    if (const auto* count = std::get_if<int64_t>(&args.logits_to_keep); count && *count != 0) {
      request.mutable_options()->set_logits_to_keep_count(*count);
    } else if (const auto* positions = std::get_if<v1::Tensor>(&args.logits_to_keep)) {
      *request.mutable_options()->mutable_logits_to_keep_positions() =
          SliceRows(*positions, begin, end);
    }
    if (split_divisor) {
      *request.mutable_options()->mutable_loss_div_factor_tensor() =
          SliceRows(std::get<v1::Tensor>(args.loss_div_factor), begin, end);
    }
    if (segment_ids.has_value()) {
      *request.mutable_options()->mutable_scoring()->mutable_segment_ids() =
          SliceRows(*segment_ids, begin, end);
    }
    if (split_candidates) {
      *request.mutable_options()->mutable_scoring()->mutable_candidate_ids() =
          SliceRows(*candidate_ids, begin, end);
    }
    *out = SerializeForwardRequest(std::move(request), Rows(hidden_states, begin, end));
  };

  CombineOptions combine;
  combine.reduction = args.loss_reduction;
  if (const auto* factor = std::get_if<double>(&args.loss_div_factor)) {
    combine.loss_div_factor = *factor;
  }
  combine.implementation = [&]() -> absl::StatusOr<v1::LossImplementation> {
    if (args.loss_implementation != v1::LOSS_IMPLEMENTATION_UNSPECIFIED) {
      return args.loss_implementation;
    }
    absl::StatusOr<v1::ModelInfo> model = GetModel(args.model);
    if (!model.ok()) return model.status();
    return model->config().loss_implementation() == v1::LOSS_IMPLEMENTATION_FUSED_LINEAR
               ? v1::LOSS_IMPLEMENTATION_FUSED_LINEAR
               : v1::LOSS_IMPLEMENTATION_DEFAULT;
  };
  MicroBatchCombiner combiner(std::move(combine));
  const int streams = static_cast<int>(std::min<int64_t>(parallel_streams, micro_batches));
  if (streams == 1) {  // combined as the answers arrive
    int64_t sent = 0;
    const std::function<bool(grpc::ByteBuffer*)> next = [&](grpc::ByteBuffer* request) {
      if (sent == micro_batches) return false;
      micro_batch(sent++, request);
      return true;
    };
    absl::Status failure;
    const OnResponse on_response = [&](int64_t index, const v1::ForwardResponse& response) {
      failure = combiner.Add(response);
      if (!failure.ok()) return false;
      if (progress) progress(index + 1, micro_batches);
      return true;
    };
    absl::Status status = ForwardStreamOn<grpc::ByteBuffer>(
        channel_.get(), OpenSerializedStream(channel_), next, on_response, /*cancellation=*/nullptr,
        [&](int64_t answered) { sent = answered; });
    if (!failure.ok()) return failure;
    if (!status.ok()) return status;
    return combiner.Finish();
  }

  // Stream s sends micro-batches [first[s], first[s + 1]); the answers are kept by index and
  // combined in order once all streams are done.
  std::vector<int64_t> first(streams + 1);
  for (int s = 0; s <= streams; ++s) first[s] = micro_batches * s / streams;
  std::vector<v1::ForwardResponse> answers(micro_batches);
  std::vector<absl::Status> statuses(streams);
  std::vector<StreamCancellation> cancellations(streams);
  absl::Mutex mu;  // progress, and cancelling streams
  int64_t done = 0;
  // A failing stream cancels the streams after it (started or not), so that the first failure
  // in the job's order is the earliest micro-batch that fails, whichever failed first in time.
  const auto cancel_after = [&](int s) {
    absl::MutexLock lock(&mu);
    for (int later = s + 1; later < streams; ++later) cancellations[later].Cancel();
  };
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<OpenStream<grpc::ByteBuffer>> opens;
  for (int s = 0; s < streams; ++s) {
    channels.push_back(StreamChannel(s));
    opens.push_back(OpenSerializedStream(channels[s]));
  }
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s]() {
      int64_t next_index = first[s];
      const std::function<bool(grpc::ByteBuffer*)> next = [&](grpc::ByteBuffer* request) {
        if (next_index == first[s + 1]) return false;
        micro_batch(next_index++, request);
        return true;
      };
      const OnResponse on_response = [&](int64_t index, const v1::ForwardResponse& response) {
        if (first[s] + index >= first[s + 1]) return false;  // more answers than asked
        answers[first[s] + index] = response;
        absl::MutexLock lock(&mu);
        ++done;
        if (progress) progress(done, micro_batches);
        return true;
      };
      statuses[s] =
          ForwardStreamOn(channels[s].get(), opens[s], next, on_response, &cancellations[s],
                          [&](int64_t answered) { next_index = first[s] + answered; });
      if (!statuses[s].ok()) cancel_after(s);
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int s = 0; s < streams; ++s) {
    if (!statuses[s].ok()) return InJobMicroBatches(statuses[s], first[s]);
  }
  if (done != micro_batches) {
    return absl::InternalError(
        absl::StrCat("the streams answered ", done, " of ", micro_batches, " micro-batches"));
  }
  for (const v1::ForwardResponse& answer : answers) {
    if (absl::Status added = combiner.Add(answer); !added.ok()) return added;
  }
  return combiner.Finish();
}

absl::StatusOr<v1::ListModelsResponse> LMHeadClient::ListModels() {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ListModelsResponse response;
  const grpc::Status status = stub_->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ModelInfo> LMHeadClient::GetModel(const std::string& name) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::GetModelRequest request;
  request.set_name(name);
  v1::ModelInfo response;
  const grpc::Status status = stub_->GetModel(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ModelInfo> LMHeadClient::LoadModel(const std::string& name,
                                                      const std::string& path, bool replace) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::LoadModelRequest request;
  request.set_name(name);
  request.set_path(path);
  request.set_replace(replace);
  v1::ModelInfo response;
  const grpc::Status status = admin_->LoadModel(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status LMHeadClient::UnloadModel(const std::string& name) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::UnloadModelRequest request;
  request.set_name(name);
  v1::UnloadModelResponse response;
  const grpc::Status status = admin_->UnloadModel(&context, request, &response);
  return status.ok() ? absl::OkStatus() : FromGrpcStatus(status);
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> LMHeadClient::Health(
    const std::string& service) {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.status();
}

}  // namespace lmhead
