// Server: the lmhead gRPC server's life cycle and its parts (docs/ARCHITECTURE.md): the frontend
// (the gRPC service), the scheduler, one executor per device and, with --allow_shared_memory,
// the shared-memory regions clients register. Binds, answers health checks
// with NOT_SERVING while the models load, then SERVING; on Shutdown it drains (NOT_SERVING, no
// new calls, queued and running work finishes within the grace period, what cannot is answered
// UNAVAILABLE). Serves lmhead.v1.LMHeadService, lmhead.v1.ModelAdminService (models loaded and
// unloaded while serving), the standard grpc.health.v1.Health service and server reflection.
// Thread-safe.
#ifndef LMHEAD_SERVER_SERVER_H_
#define LMHEAD_SERVER_SERVER_H_

#include <grpcpp/server.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/options.h"

namespace lmhead {

class Executor;
class LMHeadServiceImpl;
class ModelAdminServiceImpl;
class RegionRegistry;
class Scheduler;

class HealthCheck;

class Server {
 public:
  // Binds options.host:options.port, loads the models and starts serving; logs the bound port
  // and writes it to options.port_file once serving. UNAVAILABLE when the address cannot be
  // bound; a model's load error otherwise (the server is shut down again).
  static absl::StatusOr<std::unique_ptr<Server>> Start(const Options& options);
  ~Server();

  // The bound TCP port.
  int port() const { return port_; }

  // Graceful shutdown: health NOT_SERVING, stop accepting calls, wait for in-flight calls up to
  // options.shutdown_grace_seconds, then answer queued work UNAVAILABLE and cancel what
  // remains. Idempotent.
  void Shutdown();

  // Blocks until Shutdown has completed.
  void Wait();

 private:
  Server(const Options& options, std::shared_ptr<const BearerTokens> tokens);
  // The health status of both servers (SetServing).
  void SetServingStatus(bool serving);

  const Options options_;
  std::unique_ptr<Scheduler> scheduler_;
  // The shared-memory regions clients registered; null unless --allow_shared_memory. Outlives
  // the service (its sessions) and the executors (its regions stay mapped while jobs use them).
  std::unique_ptr<RegionRegistry> regions_;
  std::unique_ptr<LMHeadServiceImpl> service_;
  // lmhead.v1.ModelAdminService: changes the models service_ serves.
  std::unique_ptr<ModelAdminServiceImpl> admin_service_;
  std::vector<std::unique_ptr<Executor>> executors_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  // The plaintext health-only server (--health_port) and its service, null without one.
  std::unique_ptr<HealthCheck> health_check_;
  std::unique_ptr<grpc::Server> health_server_;
  int health_port_ = 0;
  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  // The /metrics endpoint (--metrics_port), null without one. Last: its gauges read the
  // scheduler and the service, so it goes first.
  std::unique_ptr<Metrics> metrics_;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_SERVER_H_
