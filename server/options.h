// Options: every setting of the lmhead server, with its unit and default. main.cc fills it from
// flags; tests may fill it directly. Free of gRPC and LibTorch.
#ifndef LMHEAD_SERVER_OPTIONS_H_
#define LMHEAD_SERVER_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace lmhead {

// The largest --max_response_bytes: protobuf's 2 GiB message limit less 1 MiB for what a
// response holds besides its tensor bytes (tensor headers, the model's name and version,
// timings; all bounded, far below 1 MiB). docs/API.md "Limits".
inline constexpr int64_t kMaxResponseBytesLimit = (int64_t{2} << 30) - (int64_t{1} << 20);
// The longest model name, in bytes; names are also limited to [A-Za-z0-9._-].
inline constexpr int kMaxModelNameBytes = 128;

// One `--model NAME=PATH.safetensors`.
struct ModelSpec {
  std::string name;  // what requests put in ForwardRequest.model
  std::string path;  // a safetensors file with the head's parameters (OLMo-core or HF names)
};

enum class LogFormat { kText, kJson };

// Whether `name` can name a model: 1 to kMaxModelNameBytes characters of [A-Za-z0-9._-].
bool IsModelName(absl::string_view name);

// Whether `host` is a loopback address: 127.0.0.0/8, ::1 (bracketed or not) or localhost.
bool IsLoopbackHost(absl::string_view host);

// "host:port", an IPv6 host in brackets ("[::1]:50051") whether or not it came with them.
std::string HostPort(const std::string& host, int port);

struct Options {
  // Address to listen on. Default "127.0.0.1" (this host only); another address needs TLS,
  // auth_token_file or allow_insecure.
  std::string host = "127.0.0.1";
  // TLS (docs/API.md "TLS"): the server's certificate chain and private key, PEM files, both or
  // neither; with them the port speaks only TLS. Re-read every tls_reload_seconds, so renewed
  // certificates take effect without a restart. Default empty: plaintext.
  std::string tls_cert;
  std::string tls_key;
  // Mutual TLS: PEM bundle of the CAs whose client certificates are accepted; clients without
  // one are refused at the handshake. Needs tls_cert. Default empty: no client certificates.
  std::string tls_client_ca;
  // How often the TLS files are checked for changes, in seconds, 1 to 86400. Default 60.
  int tls_reload_seconds = 60;
  // A second, plaintext port that serves only the standard health service (grpc.health.v1), on
  // `host`: for probes that cannot speak TLS (the kubelet's gRPC probes). 0 picks a free port
  // (logged); -1 (default): none.
  int health_port = -1;
  // Prometheus metrics (docs/OPERATIONS.md): /metrics over plain HTTP on this port of `host`,
  // without TLS or tokens; 0 picks a free port (logged); -1 (default): no metrics endpoint.
  int metrics_port = -1;
  // Whether the server may listen on a non-loopback address without authentication, where
  // anyone who reaches the port can use the devices and read the outputs (put it behind a
  // network policy). Default false: such a --host is refused at start.
  bool allow_insecure = false;
  // A file of bearer tokens, one per line (server/auth.h): every call of LMHeadService must carry
  // `authorization: Bearer TOKEN` with one of them (UNAUTHENTICATED otherwise); the health
  // service is not checked. Read at start. Default empty: no authentication.
  std::string auth_token_file;
  // A file of administrator tokens, in the same form: the ModelAdminService's calls (LoadModel,
  // UnloadModel) must carry one of them, and no token of auth_token_file may be one. Default
  // empty: model administration is off (FAILED_PRECONDITION).
  std::string admin_token_file;
  // TCP port; 0 picks a free one (written to port_file and logged). Default 50051.
  int port = 50051;
  // When set, the bound port is written there (decimal, then a newline) once the server is
  // serving. Default: unset.
  std::string port_file;

  // Models to load, in flag order; the first is the default model. Empty: the demo head.
  std::vector<ModelSpec> models;
  // The directory LoadModel reads weights from: its requests name files inside it (relative
  // paths; none leading out of it, links included). Default empty: LoadModel is refused.
  std::string model_repository;
  // Head configuration (LMHeadConfig JSON, core/config_json.h) for models that have no
  // `<weights without .safetensors>.json` beside their weights. Default: unset (such a model
  // fails to load, naming both places).
  std::string head_config_json;
  // Where weights live and compute runs, one executor per entry: a comma-separated list of
  // "cpu", "cuda" (every visible GPU) and "cuda:N"; an entry may repeat (two executors sharing
  // one device and its weights). Default "cpu".
  std::string device = "cpu";
  // ModelInfo.source shows each weights file's full path on the host; false: its file name only.
  // Default false.
  bool expose_model_paths = false;

  // The demo head served when no model is given (name "demo"): an rms layer norm without
  // bias, w_out without bias, PyTorch's default initialisation from `demo_seed`.
  int64_t demo_d_model = 64;       // hidden size; default 64
  int64_t demo_vocab_size = 1000;  // classes; default 1000
  uint64_t demo_seed = 0;          // initialisation seed; default 0
  // Parameter dtype of the demo head: "float32", "bfloat16" or "float16". Default "float32".
  std::string demo_dtype = "float32";

  // Largest request message accepted, in bytes (larger: RESOURCE_EXHAUSTED from gRPC); in
  // [1, 2^31 - 1]. Default 288 MiB: a 256 MiB request with room to spare, e.g. 256 MiB of hidden
  // states plus their int64 labels (16 MiB for bf16 at d_model 64, less for wider models).
  int64_t max_message_bytes = int64_t{288} << 20;
  // Largest response, counted as the bytes of every tensor it would carry (logits, losses,
  // argmax): a request over it is refused with RESOURCE_EXHAUSTED before any compute. In
  // [1, kMaxResponseBytesLimit]; default kMaxResponseBytesLimit (2 GiB - 1 MiB).
  int64_t max_response_bytes = kMaxResponseBytesLimit;
  // Dynamic batching (docs/ARCHITECTURE.md "Packing"): calls and stream micro-batches for one
  // model and weights variant are packed into one forward of at most this many tokens (B * S
  // summed); a larger call runs alone. 1 turns packing off. Default 8192.
  int64_t max_batch_tokens = 8192;
  // How long an idle executor waits, after the oldest queued call arrived, for more calls to
  // fill a batch, microseconds. Under load batches fill without waiting. Default 0.
  int64_t max_queue_delay_us = 0;
  // Tokens (B * S summed) that may wait in the queue at once; a call that would exceed it gets
  // RESOURCE_EXHAUSTED (a call alone in the queue always fits; stream micro-batches after the
  // first wait for room instead). Default 262144.
  int64_t max_queue_tokens = 262144;
  // ForwardStream calls open at once (each holds a server thread and up to two micro-batches);
  // more get RESOURCE_EXHAUSTED. Default 64.
  int max_open_streams = 64;
  // gRPC's synchronous server: completion queues (0: one per CPU core, at most 16), and the most
  // threads that wait for calls on each. A thread beyond that ends when its call is done, so too
  // few make gRPC start and end threads with every burst of calls (gRPC's own defaults are 1 and
  // 2). Defaults 0 and 16.
  int grpc_completion_queues = 0;
  int grpc_max_pollers = 16;
  // HTTP/2 transport settings (docs/API.md "Run the server", the --http2_* flags; 0 or -1:
  // gRPC's own). The largest frame the server accepts (SETTINGS_MAX_FRAME_SIZE), bytes, 16384 to
  // 16777215; 0: gRPC's 16 KiB.
  int http2_max_frame_bytes = 0;
  // The flow-control window the server offers each stream before BDP probing adapts it
  // (gRPC's "lookahead"), bytes, 65535 to 2^31 - 1; 0: gRPC's 64 KiB.
  int http2_stream_window_bytes = 0;
  // Adapt the windows to the connection's bandwidth-delay product (gRPC's BDP probe). Default
  // true.
  bool http2_bdp_probe = true;
  // Bytes gRPC may buffer for writing on a connection before it waits for the socket, 0 to
  // 2^31 - 1; -1: gRPC's own.
  int http2_write_buffer_bytes = -1;
  // ForwardStream reads, decodes and uploads micro-batch k+1 on a second thread while k computes
  // (two micro-batches held at most). false: one micro-batch at a time. Default true.
  bool stream_read_ahead = true;
  // Per-request configurations (dtype, layer-norm dtype or precision) other than the loaded
  // one that a model keeps converted copies of its weights for; a request that needs one more
  // gets RESOURCE_EXHAUSTED. 0 disables such overrides. Default 4.
  int max_config_variants = 4;
  // Same-host shared memory for tensors (docs/API.md "Shared memory"): the SharedMemory RPC,
  // and requests whose tensors or outputs lie in regions registered through it. Off: both
  // answer FAILED_PRECONDITION. Default false.
  bool allow_shared_memory = false;
  // Regions one SharedMemory session may hold at once; one more: RESOURCE_EXHAUSTED. In
  // [1, 4096]; default 64.
  int max_shared_memory_regions = 64;
  // SharedMemory sessions open at once (each holds a server thread while it is open); more:
  // RESOURCE_EXHAUSTED. In [1, 1024]; default 64.
  int max_shared_memory_sessions = 64;
  // POSIX shared-memory objects a session may register: only those whose key starts with this
  // ("" allows any the server can open). Without it a local client could have the server read
  // and write any object the server's user may open. Default "/lmhead" (the Python client's
  // objects are "/lmhead-<pid>-<random>").
  std::string shared_memory_key_prefix = "/lmhead";
  // POSIX regions are page-locked at registration (cudaHostRegister) when the server computes on
  // CUDA, so a GPU reads hidden states from them by DMA instead of through a staging copy; their
  // pages then stay in RAM while registered. Default true.
  bool pin_shared_memory = true;
  // How long a graceful shutdown waits for in-flight calls before cancelling them, seconds.
  // Default 30.
  double shutdown_grace_seconds = 30;
  // After this many seconds a client connection is asked to close (HTTP/2 GOAWAY, gRPC's
  // max connection age, with jitter); calls on it run to their end, and the client reconnects,
  // resolving the server's name again: how clients of a DNS name with several replicas find new
  // ones. 0 to 604800; 0 (default): never.
  int max_connection_age_seconds = 0;
  // How often the freed memory inside the malloc arena is handed back to the kernel
  // (malloc_trim), seconds; 0 never. Default 60 (docs/SOAK.md).
  double malloc_trim_seconds = 60;

  // Log lines as plain text or one JSON object per line. Default text.
  LogFormat log_format = LogFormat::kText;
  // spdlog level name: trace, debug, info, warn, error, critical, off. Default "info".
  std::string log_level = "info";
};

// OK when every option is in range; else INVALID_ARGUMENT whose message starts with the flag's
// name ("--max_response_bytes: ..."). Server::Start refuses options that fail it.
absl::Status ValidateOptions(const Options& options);

}  // namespace lmhead

#endif  // LMHEAD_SERVER_OPTIONS_H_
