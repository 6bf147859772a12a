// The server's Prometheus metrics, served over HTTP at /metrics on their own port
// (--metrics_port; docs/OPERATIONS.md lists them with a sample scrape). Names follow the style of
// Triton's nv_inference_* metrics: a `lmhead_` prefix, durations in microseconds. Model labels
// are the names of loaded models ("" for calls that named none that is loaded), so their number
// stays bounded. Thread-safe.
#ifndef LMHEAD_SERVER_METRICS_H_
#define LMHEAD_SERVER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/device_memory.h"

namespace prometheus {
class Counter;
class Exposer;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace lmhead {

class Metrics {
 public:
  // Values read at each scrape.
  struct Gauges {
    std::function<int64_t()> queue_tokens;  // tokens of the calls waiting in the queue
    std::function<int64_t()> inflight;      // Forward and ForwardStream calls being handled
    std::function<std::vector<DeviceMemory>()> device_memory;  // the CUDA devices' memory
  };

  // Serves /metrics on host:port (port 0: a free one). UNAVAILABLE when it cannot listen.
  static absl::StatusOr<std::unique_ptr<Metrics>> Start(const std::string& host, int port,
                                                        Gauges gauges);
  ~Metrics();

  // The port /metrics is served on.
  int port() const { return port_; }

  // One finished call of `method` (the RPC's name: Forward, ..., LoadModel, UnloadModel).
  void CountCall(absl::string_view method, absl::string_view model, absl::StatusCode code);
  // One computed forward (a unary call, or a stream's micro-batch): its tokens (B x S), the
  // positions its loss scored, its phases in microseconds and the calls packed with it.
  void RecordForward(absl::string_view model, int64_t tokens, int64_t scored_tokens,
                     int64_t decode_us, int64_t queue_us, int64_t compute_us, int64_t encode_us,
                     int64_t batch_size);

 private:
  class GaugeCollector;
  Metrics() = default;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<GaugeCollector> gauges_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Family<prometheus::Counter>* calls_ = nullptr;
  prometheus::Family<prometheus::Counter>* tokens_ = nullptr;
  prometheus::Family<prometheus::Counter>* scored_tokens_ = nullptr;
  prometheus::Family<prometheus::Histogram>* durations_ = nullptr;
  prometheus::Histogram* batch_size_ = nullptr;
  int port_ = 0;
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_METRICS_H_
