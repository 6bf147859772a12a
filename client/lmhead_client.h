// LMHeadClient: a C++ client of lmhead.v1.LMHeadService whose Forward mirrors LMHead.forward
// (hidden states plus the same keyword arguments), with helpers that stream a large job as
// micro-batches. No LibTorch: tensors are lmhead.v1.Tensor messages, or TensorViews of bytes held
// elsewhere (tensor_view.h; tensor_file.h reads both from .npy/.safetensors, MapTensorFile in
// place). Thread-safe: one client may serve many threads.
#ifndef LMHEAD_CLIENT_LMHEAD_CLIENT_H_
#define LMHEAD_CLIENT_LMHEAD_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/support/sync_stream.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/tensor_view.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto/lmhead/v1/lmhead.grpc.pb.h"

namespace lmhead {

struct ClientOptions {
  // Per-call deadline; zero: none. Default none.
  std::chrono::milliseconds timeout{0};
  // Sent as the `x-request-id` header (the server logs it on every line); empty: the server
  // makes one up. Default empty.
  std::string request_id;
  // Attempts per call, 1 to 5 (gRPC's limit). Calls refused with RESOURCE_EXHAUSTED or
  // UNAVAILABLE are retried after an exponential backoff with jitter (about 0.1 s, doubling up
  // to 5 s), within the call's deadline; not when the server answers that the same call would
  // fail again (a limit it enforces). Unary calls by gRPC's retry policy (the channel's service
  // config, RetryServiceConfig); a stream by this client, only while none of its micro-batches
  // has been answered (docs/API.md "Retries" says why), except that ForwardMicroBatched's streams
  // that end UNAVAILABLE after answers go on in a new stream from the first micro-batch not
  // answered. 1: no retry. Default 5.
  int max_attempts = 5;
  // A TCP connection of this client's own. gRPC otherwise shares one connection among the
  // channels of a process that go to the same address with the same settings, so that many
  // clients move their bytes over one connection. Default false.
  bool own_connection = false;
  // Sent with every call as `authorization: Bearer <auth_token>`, for a server started with
  // --auth_token_file (docs/API.md "Authentication"). Default empty: no header.
  std::string auth_token;
  // TLS (docs/API.md "TLS"): the channel speaks TLS when `tls` is set or any of the PEM texts
  // below is given. tls_root_certs: the CAs the server's certificate must chain to (empty:
  // gRPC's default roots); tls_cert_chain and tls_private_key: this client's certificate and
  // key, for a server that asks for one (mutual TLS). Defaults: plaintext.
  bool tls = false;
  std::string tls_root_certs;
  std::string tls_cert_chain;
  std::string tls_private_key;
  // The name the server's certificate must be valid for, sent as the calls' authority. Empty
  // (default): the address's host; for a list of replicas the first one's, so with TLS give the
  // name every replica's certificate holds. Implies TLS.
  std::string tls_server_name;
};

// What Connect makes of an address (docs/API.md "Replicas").
struct ChannelTarget {
  std::string target;     // the gRPC target
  bool replicas = false;  // calls are spread over what it names (gRPC's round_robin policy)
};

// The target of `address`:
// - "host:port": as it is, one server (gRPC's default pick_first);
// - a gRPC target with a scheme, as it is; "dns:///NAME:PORT", "ipv4:..." and "ipv6:..." name
//   replicas (every address the name resolves to, or the list holds);
// - several "IP:PORT" ("[IPv6]:PORT") separated by commas, all IPv4 or all IPv6: the target
//   "ipv4:A:P,B:Q" (or "ipv6:..."), replicas.
// INVALID_ARGUMENT (naming "address") for an empty entry, a host name or a missing port in a
// list (gRPC resolves one name per channel: give one dns:///NAME:PORT instead), or a list that
// mixes IPv4 and IPv6.
absl::StatusOr<ChannelTarget> ChannelTargetOf(absl::string_view address);

// The gRPC service config that Connect gives its channel for `max_attempts` (docs/API.md
// "Retries"): a retryPolicy for lmhead.v1.LMHeadService's unary methods, none when
// max_attempts <= 1; with `round_robin` also gRPC's round_robin load balancing (replicas).
// "" when it would hold nothing.
std::string RetryServiceConfig(int max_attempts, bool round_robin = false);

// How long a stream waits in all for its channel's connection when it is not up
// (LMHeadClient::ForwardStream). gRPC 1.51 connects again about 1 s after a failed attempt, then
// 1.6 s after that (each +-20%): three attempts fit.
constexpr absl::Duration kConnectionWait = absl::Seconds(5);

// Cancels a ForwardStream call from another thread, whichever attempt it is on. Thread-safe.
class StreamCancellation {
 public:
  // Cancels the running attempt, and any later one before it starts.
  void Cancel();

 private:
  friend class LMHeadClient;
  // Makes `context` the running attempt's; false when Cancel came first.
  bool Attach(grpc::ClientContext* context);
  void Detach();
  // Waits up to `delay` for Cancel; true when cancelled.
  bool WaitForCancel(absl::Duration delay);

  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;
};

// The scoring outputs a call asks for (ForwardOptions.scoring, answered in
// ForwardResponse.scoring; docs/API.md "Scoring"): none by default. B is the batch, S seq_len,
// S' the positions logits_to_keep keeps.
struct ScoringArgs {
  bool label_logprobs = false;  // (B, S') FP32 log p(label); needs labels
  bool entropy = false;         // (B, S') FP32
  bool label_rank = false;      // (B, S') INT64 1 + #{tokens with a larger logit}; needs labels
  int32_t top_k = 0;            // 0: none; 1 to 64 (and <= vocab_size): top_k_ids, _logprobs
  // INT64/INT32 token ids, (C,) for every kept position or (B, S', C) per position: their
  // log-probabilities, candidate_logprobs (B, S', C).
  std::optional<v1::Tensor> candidate_ids;
  // INT64/INT32 (B, S) like labels (sliced by logits_to_keep as they are): per position the
  // continuation it belongs to, or -1 for none; gives the (B, G) segment_* sums. Needs labels.
  std::optional<v1::Tensor> segment_ids;

  // Whether any output is asked for.
  bool any() const {
    return label_logprobs || entropy || label_rank || top_k != 0 || candidate_ids.has_value() ||
           segment_ids.has_value();
  }
};

// LMHead.forward's keyword arguments (labels included) and the service's own controls. Unset
// fields take the server's defaults, which are upstream's.
struct ForwardArgs {
  std::string model;                    // empty: the server's default model
  std::optional<v1::Tensor> labels;     // (batch, seq_len) INT64/INT32
  std::optional<int64_t> ignore_index;  // default -100
  v1::LossReduction loss_reduction = v1::LOSS_REDUCTION_UNSPECIFIED;  // mean
  std::optional<double> z_loss_multiplier;
  std::variant<std::monostate, double, v1::Tensor> loss_div_factor;
  std::optional<bool> return_logits;
  std::variant<int64_t, v1::Tensor> logits_to_keep = int64_t{0};
  v1::LossImplementation loss_implementation = v1::LOSS_IMPLEMENTATION_UNSPECIFIED;
  v1::DataType compute_dtype = v1::DATA_TYPE_UNSPECIFIED;  // the model's dtype
  v1::DataType logits_dtype = v1::DATA_TYPE_UNSPECIFIED;   // the compute dtype
  // The most bytes of the tile of logits fused_linear holds at once (options.logit_tile_bytes);
  // unset: the server's default.
  std::optional<int64_t> logit_tile_bytes;
  // The old name of logit_tile_bytes, kept for one release: sent as the deprecated field
  // options.fused_chunk_bytes (the server refuses the two when they disagree).
  [[deprecated("use logit_tile_bytes")]] std::optional<int64_t> fused_chunk_bytes;
  bool return_argmax = false;  // also return each kept position's most likely token id
  ScoringArgs scoring;         // scoring outputs; default none

  // Declared, and defined where fused_chunk_bytes' deprecation is silenced: GCC would otherwise
  // warn about it in every translation unit that makes or copies a ForwardArgs.
  ForwardArgs();
  ForwardArgs(const ForwardArgs&);
  ForwardArgs(ForwardArgs&&);
  ForwardArgs& operator=(const ForwardArgs&);
  ForwardArgs& operator=(ForwardArgs&&);
  ~ForwardArgs();
};

// The request Forward sends for `hidden_states` and `args`.
v1::ForwardRequest MakeForwardRequest(const v1::Tensor& hidden_states, const ForwardArgs& args);

// grpc::Status -> absl::Status (same code and message); the client's one such conversion.
absl::Status FromGrpcStatus(const grpc::Status& status);

class LMHeadClient {
 public:
  // A channel to `address` (ChannelTargetOf: "host:port", several "IP:PORT" separated by
  // commas, or a gRPC target such as "dns:///NAME:PORT"; an address it refuses is given to
  // gRPC as it is, whose calls then fail, so check a user's address with ChannelTargetOf
  // first) that sends and receives messages of any size gRPC allows (the server enforces its
  // own limit) and retries as options.max_attempts says; requests up to 256 MiB are kept for a
  // retry. With replicas, calls are spread over them round-robin, a replica that goes away is
  // left out until it is back, and a call it fails with UNAVAILABLE is retried on another (a
  // stream only before its first answer).
  static std::unique_ptr<LMHeadClient> Connect(const std::string& address,
                                               ClientOptions options = {});
  LMHeadClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options);

  // LMHead.forward(hidden_states, **args) on the server, in one message each way.
  absl::StatusOr<v1::ForwardResponse> Forward(const v1::Tensor& hidden_states,
                                              const ForwardArgs& args);
  absl::StatusOr<v1::ForwardResponse> Forward(const v1::ForwardRequest& request);
  // Forward of views (e.g. MapTensorFile's), the same request: `labels` (or args.labels; both
  // given: INVALID_ARGUMENT) are copied into it, and the hidden states are sent from where they
  // are when the view has an owner (SerializeForwardRequest: gRPC writes them to the connection
  // from there), else copied once, into the serialised request.
  absl::StatusOr<v1::ForwardResponse> Forward(const TensorView& hidden_states,
                                              const std::optional<TensorView>& labels,
                                              const ForwardArgs& args);

  // One ForwardStream call: `next` fills the next micro-batch and returns false when there is
  // none; `on_response` receives each answer, in order, with its index (returning false
  // cancels the call). Requests are written while responses are read, so the server always
  // has work. A stream the server refuses before its first answer (RESOURCE_EXHAUSTED or
  // UNAVAILABLE: too many open streams, a full queue) is retried as options.max_attempts says,
  // resending the micro-batches it had sent (up to 256 MiB of them; beyond, no retry); `next`
  // is called once per micro-batch whatever the attempts. Each attempt first waits for the
  // channel's connection, up to kConnectionWait in all of the call and within its deadline, so
  // that a connection attempt that fails once (gRPC reconnects after about 1 s) costs a wait, not
  // the call; a server that cannot be reached fails it with gRPC's UNAVAILABLE after that wait.
  // `cancellation` may be given to cancel from another thread.
  using NextRequest = std::function<bool(v1::ForwardRequest* request)>;
  using OnResponse = std::function<bool(int64_t index, const v1::ForwardResponse& response)>;
  absl::Status ForwardStream(const NextRequest& next, const OnResponse& on_response,
                             StreamCancellation* cancellation = nullptr);

  // Forward for a job of any size: splits hidden_states along the batch dimension into
  // micro-batches of at most `max_micro_batch_bytes` of hidden states (at least one row each),
  // streams them, and combines the answers into what one Forward over the whole job returns, by
  // the rule of docs/API.md "Combining micro-batches" (MicroBatchCombiner). Labels, a (B, K)
  // logits_to_keep, for "none" a (B, ...) loss_div_factor tensor, and the scoring's
  // segment_ids and (B, S', C) candidate_ids are split with the batch ((C,) candidate ids go
  // whole to every micro-batch). A tensor loss_div_factor with mean or sum is INVALID_ARGUMENT
  // (pass a number), as are segment_ids or (B, S', C) candidate_ids whose first dimension is
  // not the batch of hidden_states. `progress` is
  // called after each micro-batch with (done, total). `parallel_streams` > 1 spreads the
  // micro-batches over that many ForwardStream calls at once, each on a connection of its own
  // (clients made by Connect) and given a run of consecutive micro-batches; the answers are
  // combined in the job's order, so the result is one stream's. A failing stream cancels the
  // streams after it; the job fails with the first failure in its order, its message's
  // " (micro-batch N)" counted in the job. Each stream holds one of the server's
  // --max_open_streams while it runs.
  absl::StatusOr<v1::ForwardResponse> ForwardMicroBatched(
      const v1::Tensor& hidden_states, const ForwardArgs& args, int64_t max_micro_batch_bytes,
      const std::function<void(int64_t done, int64_t total)>& progress = {},
      int parallel_streams = 1);
  // ForwardMicroBatched of views (e.g. MapTensorFile's of a memory-mapped file), the same requests
  // and result; nothing of the whole job is copied. Each micro-batch's request is made as the
  // stream asks for it: its rows of `labels` (or args.labels; both given: INVALID_ARGUMENT) are
  // copied into it, and its rows of hidden states are sent from where they are when the view has an
  // owner (SerializeForwardRequest; a retried stream resends them from there too), else copied
  // once, into the serialised request. The views' bytes must stay valid and unchanged until the
  // call returns. (The v1::Tensor overload is this one with views without owner.)
  absl::StatusOr<v1::ForwardResponse> ForwardMicroBatched(
      const TensorView& hidden_states, const std::optional<TensorView>& labels,
      const ForwardArgs& args, int64_t max_micro_batch_bytes,
      const std::function<void(int64_t done, int64_t total)>& progress = {},
      int parallel_streams = 1);
  // The old names of ForwardMicroBatched, kept for one release.
  [[deprecated("use ForwardMicroBatched")]] absl::StatusOr<v1::ForwardResponse> ForwardChunked(
      const v1::Tensor& hidden_states, const ForwardArgs& args, int64_t max_micro_batch_bytes,
      const std::function<void(int64_t done, int64_t total)>& progress = {},
      int parallel_streams = 1) {
    return ForwardMicroBatched(hidden_states, args, max_micro_batch_bytes, progress,
                               parallel_streams);
  }
  [[deprecated("use ForwardMicroBatched")]] absl::StatusOr<v1::ForwardResponse> ForwardChunked(
      const TensorView& hidden_states, const std::optional<TensorView>& labels,
      const ForwardArgs& args, int64_t max_micro_batch_bytes,
      const std::function<void(int64_t done, int64_t total)>& progress = {},
      int parallel_streams = 1) {
    return ForwardMicroBatched(hidden_states, labels, args, max_micro_batch_bytes, progress,
                               parallel_streams);
  }

  absl::StatusOr<v1::ListModelsResponse> ListModels();
  absl::StatusOr<v1::ModelInfo> GetModel(const std::string& name = "");

  // lmhead.v1.ModelAdminService (docs/API.md "Models at run time"); the client's auth_token must
  // be one of the server's administrator tokens. LoadModel: the weights at `path`, relative to
  // the server's model repository, served as `name` (replacing a loaded model of that name only
  // when `replace`); the loaded model's info. UnloadModel: stops serving `name`.
  absl::StatusOr<v1::ModelInfo> LoadModel(const std::string& name, const std::string& path,
                                          bool replace = false);
  absl::Status UnloadModel(const std::string& name);

  // grpc.health.v1.Health/Check for `service` ("" is the server as a whole).
  absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> Health(
      const std::string& service = "");

 private:
  void Prepare(grpc::ClientContext* context) const;
  // Opens one attempt of a ForwardStream call whose requests are `Request`s on `context`.
  template <class Request>
  using OpenStream =
      std::function<std::unique_ptr<grpc::ClientReaderWriter<Request, v1::ForwardResponse>>(
          grpc::ClientContext* context)>;
  // ForwardStream with requests that are `Request`s: v1::ForwardRequest messages (ForwardStream),
  // or grpc::ByteBuffers serialised by SerializeForwardRequest (ForwardMicroBatched). With
  // `rewind`, a stream that ends UNAVAILABLE after answers (its server went away) is opened again,
  // within options.max_attempts, for the micro-batches not answered: rewind(n) makes `next` start
  // again at micro-batch n (the first unanswered), and on_response's index goes on from there.
  template <class Request>
  absl::Status ForwardStreamOn(grpc::Channel* channel,  // `open`'s; waited for (AwaitConnection)
                               const OpenStream<Request>& open,
                               const std::function<bool(Request* request)>& next,
                               const OnResponse& on_response, StreamCancellation* cancellation,
                               const std::function<void(int64_t answered)>& rewind = {});
  // The channel of stream `index` of a job's parallel streams: 0 this client's, others a channel
  // (connection) each, opened on first use (all this client's when it was not made by Connect).
  std::shared_ptr<grpc::Channel> StreamChannel(int index);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::LMHeadService::Stub> stub_;
  std::unique_ptr<v1::ModelAdminService::Stub> admin_;
  // Set by Connect: opens another channel to the same server, with a connection of its own.
  std::function<std::shared_ptr<grpc::Channel>()> open_channel_;
  absl::Mutex streams_mu_;
  std::vector<std::shared_ptr<grpc::Channel>> stream_channels_
      ABSL_GUARDED_BY(streams_mu_);  // index i: stream i + 1
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

}  // namespace lmhead

#endif  // LMHEAD_CLIENT_LMHEAD_CLIENT_H_
