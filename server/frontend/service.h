// LMHeadServiceImpl: the frontend, the gRPC handlers of lmhead.v1.LMHeadService
// (docs/ARCHITECTURE.md). Each handler admits the call (loading, draining, request id, deadline),
// decodes the wire form, hands the work to the scheduler and encodes what comes back; it
// computes nothing itself. Thread-safe.
//
// It registers the service's methods itself rather than deriving from the generated
// LMHeadService::Service, so that Forward and ForwardStream read their requests as
// ReceivedForwardRequest, whose hidden states stay in the received buffers until they are
// copied to where the executor reads them (docs/notes/receive_path.md). The wire API is the
// generated service's: same method paths, same messages.
#ifndef LMHEAD_SERVER_FRONTEND_SERVICE_H_
#define LMHEAD_SERVER_FRONTEND_SERVICE_H_

#include <atomic>
#include <chrono>
#include <memory>

#include "absl/synchronization/mutex.h"
#include "proto/lmhead/v1/lmhead.grpc.pb.h"
#include "server/auth.h"
#include "server/concurrency_limiter.h"
#include "server/metrics.h"
#include "server/options.h"
#include "server/received_request.h"

namespace lmhead {

class ModelRegistry;
class RegionRegistry;
class Scheduler;

class LMHeadServiceImpl final : public grpc::Service {
 public:
  // `scheduler` must outlive the service; so must `regions`, the shared-memory regions, null
  // when shared memory is off (--allow_shared_memory). `tokens`: the bearer tokens every call
  // must carry one of (UNAUTHENTICATED otherwise); null: none needed.
  LMHeadServiceImpl(const Options& options, Scheduler* scheduler, RegionRegistry* regions = nullptr,
                    std::shared_ptr<const BearerTokens> tokens = nullptr);
  ~LMHeadServiceImpl() override;

  // Counts calls and forwards in `metrics` (which must outlive the service) from now on; set
  // before the server starts serving. Default: none.
  void SetMetrics(Metrics* metrics) { metrics_ = metrics; }

  // Forward and ForwardStream calls inside their handler now.
  int running_calls() const { return running_calls_.load(); }

  // Makes the models available, in place of those before (calls already admitted go on with
  // the registry they were admitted with). Until the first, every RPC answers UNAVAILABLE
  // ("loading").
  void SetRegistry(std::shared_ptr<const ModelRegistry> registry);
  // The models served now; null while loading.
  std::shared_ptr<const ModelRegistry> registry() const;

  grpc::Status Forward(grpc::ServerContext* context, const ReceivedForwardRequest* request,
                       v1::ForwardResponse* response);
  grpc::Status ForwardStream(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::ForwardResponse, ReceivedForwardRequest>* stream);
  grpc::Status ListModels(grpc::ServerContext* context, const v1::ListModelsRequest* request,
                          v1::ListModelsResponse* response);
  grpc::Status GetModel(grpc::ServerContext* context, const v1::GetModelRequest* request,
                        v1::ModelInfo* response);
  // A shared-memory session: its regions live until the call ends (docs/API.md "Shared
  // memory"). Does not count as running for WaitIdle: a session idles for as long as its client
  // runs, and server shutdown ends it.
  grpc::Status SharedMemory(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<v1::SharedMemoryResponse, v1::SharedMemoryRequest>* stream);

  // Graceful shutdown: from now on new Forward/ForwardStream calls get UNAVAILABLE; calls
  // already running go on (an open stream may still send micro-batches).
  void StartDraining() { draining_ = true; }
  bool draining() const { return draining_; }
  // Waits until no Forward/ForwardStream call is running, or until `deadline`; true if idle.
  bool WaitIdle(std::chrono::system_clock::time_point deadline) const;

  // Non-finite hidden-state values seen since start (they propagate, see ForwardResponse).
  int64_t nonfinite_inputs() const { return nonfinite_inputs_.load(); }

 private:
  const Options options_;
  Scheduler* const scheduler_;
  RegionRegistry* const regions_;
  const std::shared_ptr<const BearerTokens> tokens_;
  Metrics* metrics_ = nullptr;
  // Forward and ForwardStream calls inside their handler.
  std::atomic<int> running_calls_{0};
  ConcurrencyLimiter open_streams_;
  ConcurrencyLimiter shared_memory_sessions_;
  std::atomic<int64_t> nonfinite_inputs_{0};
  std::atomic<bool> draining_{false};
  // Written by SetRegistry, read by every call.
  std::shared_ptr<const ModelRegistry> registry_;
};

// The handlers of lmhead.v1.ModelAdminService: LoadModel and UnloadModel change the models that
// an LMHeadServiceImpl serves, one change at a time, each a new registry swapped in whole
// (ModelRegistry::With, Without). Thread-safe.
class ModelAdminServiceImpl final : public v1::ModelAdminService::Service {
 public:
  // `models` must outlive this service. `admin_tokens`: the tokens a call must carry one of;
  // null: model administration is off and every call gets FAILED_PRECONDITION.
  ModelAdminServiceImpl(const Options& options, LMHeadServiceImpl* models,
                        std::shared_ptr<const BearerTokens> admin_tokens);

  // As LMHeadServiceImpl::SetMetrics.
  void SetMetrics(Metrics* metrics) { metrics_ = metrics; }

  grpc::Status LoadModel(grpc::ServerContext* context, const v1::LoadModelRequest* request,
                         v1::ModelInfo* response) override;
  grpc::Status UnloadModel(grpc::ServerContext* context, const v1::UnloadModelRequest* request,
                           v1::UnloadModelResponse* response) override;

 private:
  absl::Status Load(const v1::LoadModelRequest& request, absl::string_view request_id,
                    v1::ModelInfo* info);
  absl::Status Unload(const v1::UnloadModelRequest& request, absl::string_view request_id);

  const Options options_;
  LMHeadServiceImpl* const models_;
  const std::shared_ptr<const BearerTokens> admin_tokens_;
  Metrics* metrics_ = nullptr;
  // Held through each change: read the registry, load, swap in the changed copy.
  absl::Mutex change_mu_;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_FRONTEND_SERVICE_H_
