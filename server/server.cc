#include "server/server.h"

#include <grpcpp/ext/health_check_service_server_builder_option.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/impl/server_builder_plugin.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <fstream>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto/lmhead/v1/lmhead.grpc.pb.h"
#include "server/device_memory.h"
#include "server/executor/executor.h"
#include "server/frontend/service.h"
#include "server/logging.h"
#include "server/model_registry.h"
#include "server/scheduler/scheduler.h"
#include "server/shared_memory/shared_memory.h"

namespace lmhead {
namespace {

// The health status of the server as a whole ("") and of lmhead.v1.LMHeadService.
void SetServing(grpc::Server* server, bool serving) {
  if (grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService()) {
    health->SetServingStatus(v1::LMHeadService::service_full_name(), serving);
    health->SetServingStatus(serving);  // every service named so far, "" included
  }
}

}  // namespace

Server::Server(const Options& options, std::shared_ptr<const BearerTokens> tokens)
    : options_(options),
      scheduler_(std::make_unique<Scheduler>(
          SchedulerLimits{options.max_batch_tokens, options.max_queue_tokens,
                          absl::Microseconds(options.max_queue_delay_us)})),
      regions_(options.allow_shared_memory
                   ? std::make_unique<RegionRegistry>(
                         options.max_shared_memory_regions, options.shared_memory_key_prefix,
                         options.pin_shared_memory && absl::StrContains(options.device, "cuda"))
                   : nullptr),
      service_(std::make_unique<LMHeadServiceImpl>(options, scheduler_.get(), regions_.get(),
                                                   std::move(tokens))) {}

Server::~Server() {
  Shutdown();
  Wait();
  // The executors finish the batch they run and stop.
  scheduler_->Close();
  scheduler_->AbortQueued(absl::UnavailableError("the server shut down before this call ran"));
  executors_.clear();
}

namespace {

// Plaintext, or TLS from files gRPC's certificate provider re-reads every tls_reload_seconds
// (mutual TLS with tls_client_ca).
std::shared_ptr<grpc::ServerCredentials> ServerCredentialsFor(const Options& options) {
  if (options.tls_cert.empty()) return grpc::InsecureServerCredentials();
  const auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.tls_key, options.tls_cert, options.tls_client_ca,
      static_cast<unsigned>(options.tls_reload_seconds));
  grpc::experimental::TlsServerCredentialsOptions tls(provider);
  tls.watch_identity_key_cert_pairs();
  if (options.tls_client_ca.empty()) {
    tls.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    tls.watch_root_certs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(tls);
}

}  // namespace

// grpc.health.v1.Health's Check for the health-only port: the status the main server's health
// service has for "" and lmhead.v1.LMHeadService (gRPC's default health service cannot run on a
// server without services of its own). Watch is not offered there. Thread-safe.
class HealthCheck final : public grpc::health::v1::Health::Service {
 public:
  void SetServing(bool serving) { serving_ = serving; }

  grpc::Status Check(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override {
    if (!request->service().empty() &&
        request->service() != v1::LMHeadService::service_full_name()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service");
    }
    response->set_status(serving_ ? grpc::health::v1::HealthCheckResponse::SERVING
                                  : grpc::health::v1::HealthCheckResponse::NOT_SERVING);
    return grpc::Status::OK;
  }

 private:
  std::atomic<bool> serving_{false};
};

namespace {

// Removes gRPC's reflection service from a builder (its plugin registers itself in every
// builder of a process that links it).
class WithoutReflection : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments*) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    plugins->erase(
        std::remove_if(plugins->begin(), plugins->end(),
                       [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
                         return dynamic_cast<grpc::reflection::ProtoServerReflectionPlugin*>(
                                    plugin.get()) != nullptr;
                       }),
        plugins->end());
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const Options& options) {
  if (absl::Status status = ValidateOptions(options); !status.ok()) return status;
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  // The tokens of --auth_token_file and --admin_token_file (null when not given); ValidateOptions
  // has read both files already.
  std::shared_ptr<const BearerTokens> tokens, admin_tokens;
  for (auto [path, flag, out] :
       {std::make_tuple(&options.auth_token_file, "auth_token_file", &tokens),
        std::make_tuple(&options.admin_token_file, "admin_token_file", &admin_tokens)}) {
    if (path->empty()) continue;
    absl::StatusOr<std::unique_ptr<const BearerTokens>> read = BearerTokens::Read(*path, flag);
    if (!read.ok()) return read.status();
    *out = *std::move(read);
  }
  auto server = std::unique_ptr<Server>(new Server(options, std::move(tokens)));
  server->admin_service_ = std::make_unique<ModelAdminServiceImpl>(options, server->service_.get(),
                                                                   std::move(admin_tokens));

  const std::string address = HostPort(options.host, options.port);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, ServerCredentialsFor(options), &server->port_);
  // One socket per address. With SO_REUSEPORT gRPC opens a second listener, which for port 0
  // gets a port of its own that nobody is told about (and another process could share ours).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  const int queues = options.grpc_completion_queues > 0
                         ? options.grpc_completion_queues
                         : std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 16);
  builder.SetSyncServerOption(grpc::ServerBuilder::NUM_CQS, queues);
  builder.SetSyncServerOption(grpc::ServerBuilder::MAX_POLLERS, options.grpc_max_pollers);
  builder.SetMaxSendMessageSize(INT_MAX);
  if (options.http2_max_frame_bytes > 0) {
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, options.http2_max_frame_bytes);
  }
  if (options.http2_stream_window_bytes > 0) {
    builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES,
                               options.http2_stream_window_bytes);
  }
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, options.http2_bdp_probe ? 1 : 0);
  if (options.max_connection_age_seconds > 0) {
    // gRPC's grace after the GOAWAY stays unbounded: no call is cut short.
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                               options.max_connection_age_seconds * 1000);
  }
  if (options.http2_write_buffer_bytes >= 0) {
    builder.AddChannelArgument(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, options.http2_write_buffer_bytes);
  }
  // Reflection describes the API only, but with tokens every call but the health service's needs
  // one, and reflection's handlers cannot check them: it is left out (grpcurl then takes -proto).
  if (!options.auth_token_file.empty()) {
    builder.SetOption(std::make_unique<WithoutReflection>());
  }
  if (options.metrics_port >= 0) {
    Metrics::Gauges gauges;
    gauges.queue_tokens = [scheduler = server->scheduler_.get()] {
      return scheduler->queued_tokens();
    };
    gauges.inflight = [service = server->service_.get()] {
      return static_cast<int64_t>(service->running_calls());
    };
    absl::StatusOr<std::vector<std::string>> devices = ExecutorDevices(options.device);
    if (devices.ok()) {
      gauges.device_memory = [devices = *devices] { return ReadDeviceMemory(devices); };
    }
    absl::StatusOr<std::unique_ptr<Metrics>> metrics =
        Metrics::Start(options.host, options.metrics_port, std::move(gauges));
    if (!metrics.ok()) return metrics.status();
    server->metrics_ = *std::move(metrics);
    server->service_->SetMetrics(server->metrics_.get());
    server->admin_service_->SetMetrics(server->metrics_.get());
    LogInfo(kNoRequest, absl::StrCat("metrics at http://", options.host, ":",
                                     server->metrics_->port(), "/metrics"));
  }
  builder.RegisterService(server->service_.get());
  builder.RegisterService(server->admin_service_.get());
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  if (options.health_port >= 0) {
    const std::string health_address = HostPort(options.host, options.health_port);
    grpc::ServerBuilder health;
    health.AddListeningPort(health_address, grpc::InsecureServerCredentials(),
                            &server->health_port_);
    health.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    health.SetOption(std::make_unique<WithoutReflection>());
    // Ours instead of gRPC's default health service, which would register the same method.
    health.SetOption(std::make_unique<grpc::HealthCheckServiceServerBuilderOption>(nullptr));
    server->health_check_ = std::make_unique<HealthCheck>();
    health.RegisterService(server->health_check_.get());
    server->health_server_ = health.BuildAndStart();
    if (server->health_server_ == nullptr || server->health_port_ == 0) {
      server->Shutdown();
      return absl::UnavailableError(
          absl::StrCat("--health_port: cannot listen on ", health_address));
    }
    LogInfo(kNoRequest,
            absl::StrCat("health checks (plaintext) on ", options.host, ":", server->health_port_));
  }
  server->SetServingStatus(false);
  LogInfo(kNoRequest, absl::StrCat("listening on ", options.host, ":", server->port_,
                                   " (NOT_SERVING while loading models)"));
  const std::string security = absl::StrCat(
      options.tls_cert.empty()        ? "plaintext"
      : options.tls_client_ca.empty() ? "TLS"
                                      : "mutual TLS",
      options.auth_token_file.empty() ? ", no bearer tokens" : ", bearer tokens required",
      options.tls_cert.empty()
          ? ""
          : absl::StrCat(" (TLS files re-read every ", options.tls_reload_seconds, " s)"),
      options.admin_token_file.empty()
          ? ", model administration off"
          : absl::StrCat(", model administration with admin tokens",
                         options.model_repository.empty() ? " (unloading only: no "
                                                            "--model_repository)"
                                                          : ""));
  if (options.tls_cert.empty() && options.auth_token_file.empty() &&
      !IsLoopbackHost(options.host)) {
    LogWarning(kNoRequest, absl::StrCat("security: ", security, " on ", options.host,
                                        " (--allow_insecure): anyone who reaches the port can "
                                        "use the server"));
  } else {
    LogInfo(kNoRequest, absl::StrCat("security: ", security));
  }

  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry = ModelRegistry::Load(options);
  if (!registry.ok()) {
    server->Shutdown();
    return registry.status();
  }
  for (const auto& model : (*registry)->List()) {
    LogInfo(kNoRequest, absl::StrCat("model '", model->name(), "' version ", model->version(),
                                     " from ", model->source()));
  }
  const std::vector<std::string>& devices = (*registry)->devices();
  for (size_t i = 0; i < devices.size(); ++i) {
    server->executors_.push_back(
        std::make_unique<Executor>(server->scheduler_.get(), devices[i], static_cast<int>(i)));
  }
  LogInfo(kNoRequest,
          absl::StrCat(devices.size(), devices.size() == 1 ? " executor" : " executors", " (",
                       absl::StrJoin(devices, ", "), "); ",
                       options.max_batch_tokens > 1
                           ? absl::StrCat("batches of up to ", options.max_batch_tokens, " tokens")
                           : std::string("packing off (one call a batch)"),
                       ", queue of ", options.max_queue_tokens, " tokens"));
  if (options.allow_shared_memory) {
    LogInfo(kNoRequest,
            absl::StrCat("shared memory on (--allow_shared_memory): clients on this host only, up "
                         "to ",
                         options.max_shared_memory_sessions, " sessions of ",
                         options.max_shared_memory_regions, " regions, ",
                         options.shared_memory_key_prefix.empty()
                             ? std::string("objects of any key")
                             : absl::StrCat("object keys starting with '",
                                            options.shared_memory_key_prefix, "'")));
  }
  server->service_->SetRegistry(std::shared_ptr<const ModelRegistry>(*std::move(registry)));
  server->SetServingStatus(true);
  LogInfo(kNoRequest, absl::StrCat("serving on port ", server->port_));
  if (!options.port_file.empty()) {
    // Written under another name and renamed, so readers never see a partial file.
    const std::string temporary = options.port_file + ".tmp";
    std::ofstream(temporary) << server->port_ << "\n";
    if (std::rename(temporary.c_str(), options.port_file.c_str()) != 0) {
      server->Shutdown();
      return absl::InternalError(absl::StrCat("cannot write --port_file ", options.port_file));
    }
  }
  return server;
}

void Server::Shutdown() {
  {
    absl::MutexLock lock(&shutdown_mu_);
    if (shut_down_ || server_ == nullptr) return;
    shut_down_ = true;
  }
  // Health watchers and probes see NOT_SERVING first; new work is refused while running
  // calls finish. Only then are the listeners closed and what remains (health watches,
  // calls past the grace period) cancelled: gRPC's own Shutdown would wait for endless
  // health watches until the deadline.
  SetServingStatus(false);
  service_->StartDraining();
  LogInfo(kNoRequest, absl::StrCat("draining: NOT_SERVING, waiting up to ",
                                   options_.shutdown_grace_seconds, " s for in-flight calls"));
  const auto grace = std::chrono::duration_cast<std::chrono::system_clock::duration>(
      std::chrono::duration<double>(options_.shutdown_grace_seconds));
  if (!service_->WaitIdle(std::chrono::system_clock::now() + grace)) {
    LogWarning(kNoRequest,
               "grace period over: queued work is answered UNAVAILABLE, calls still running are "
               "cancelled");
    scheduler_->Close();
    scheduler_->AbortQueued(
        absl::UnavailableError("the server is shutting down and its grace period ran out before "
                               "this call ran"));
  }
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  if (health_server_ != nullptr) {
    health_server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  }
  LogInfo(kNoRequest, "shut down");
}

void Server::Wait() {
  if (server_ != nullptr) server_->Wait();
  if (health_server_ != nullptr) health_server_->Wait();
}

void Server::SetServingStatus(bool serving) {
  SetServing(server_.get(), serving);
  if (health_check_ != nullptr) health_check_->SetServing(serving);
}

}  // namespace lmhead
