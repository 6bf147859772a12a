#include "server/metrics.h"

#include <prometheus/client_metric.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <exception>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/options.h"

namespace lmhead {
namespace {

// Microseconds: 50 us to 100 s, about three buckets per decade.
const prometheus::Histogram::BucketBoundaries& DurationBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      50,     100,    250,    500,     1000,    2500,    5000,     10000,    25000,    50000,
      100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000, 100000000};
  return *buckets;
}

}  // namespace

// The gauges, read when Prometheus scrapes.
class Metrics::GaugeCollector : public prometheus::Collectable {
 public:
  explicit GaugeCollector(Gauges gauges) : gauges_(std::move(gauges)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    const auto gauge = [](std::string name, std::string help, int64_t value) {
      prometheus::MetricFamily family;
      family.name = std::move(name);
      family.help = std::move(help);
      family.type = prometheus::MetricType::Gauge;
      prometheus::ClientMetric metric;
      metric.gauge.value = static_cast<double>(value);
      family.metric.push_back(std::move(metric));
      return family;
    };
    std::vector<prometheus::MetricFamily> families;
    if (gauges_.queue_tokens) {
      families.push_back(gauge("lmhead_queue_tokens",
                               "Tokens of the calls waiting in the request queue",
                               gauges_.queue_tokens()));
    }
    if (gauges_.inflight) {
      families.push_back(gauge("lmhead_inflight_calls",
                               "Forward and ForwardStream calls being handled",
                               gauges_.inflight()));
    }
    if (gauges_.device_memory) {
      const std::vector<DeviceMemory> devices = gauges_.device_memory();
      if (!devices.empty()) {
        using Field = int64_t DeviceMemory::*;
        const std::tuple<const char*, const char*, Field> kinds[] = {
            {"lmhead_device_memory_total_bytes", "Memory of the device", &DeviceMemory::total},
            {"lmhead_device_memory_used_bytes",
             "Memory in use on the device, by every process (total less free)",
             &DeviceMemory::used},
            {"lmhead_device_memory_reserved_bytes",
             "Device memory held by this server's LibTorch caching allocator",
             &DeviceMemory::reserved},
            {"lmhead_device_memory_allocated_bytes",
             "Device memory in this server's tensors now (weights, work in flight)",
             &DeviceMemory::allocated},
        };
        for (const auto& [name, help, field] : kinds) {
          prometheus::MetricFamily family;
          family.name = name;
          family.help = help;
          family.type = prometheus::MetricType::Gauge;
          for (const DeviceMemory& device : devices) {
            prometheus::ClientMetric metric;
            metric.label.push_back({"device", device.device});
            metric.gauge.value = static_cast<double>(device.*field);
            family.metric.push_back(std::move(metric));
          }
          families.push_back(std::move(family));
        }
      }
    }
    return families;
  }

 private:
  const Gauges gauges_;
};

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Start(const std::string& host, int port,
                                                        Gauges gauges) {
  auto metrics = std::unique_ptr<Metrics>(new Metrics());
  metrics->registry_ = std::make_shared<prometheus::Registry>();
  prometheus::Registry& registry = *metrics->registry_;
  metrics->calls_ = &prometheus::BuildCounter()
                         .Name("lmhead_request_total")
                         .Help("Finished calls, by method, model and status code")
                         .Register(registry);
  metrics->tokens_ = &prometheus::BuildCounter()
                          .Name("lmhead_tokens_total")
                          .Help("Tokens of hidden states computed (B x S per forward)")
                          .Register(registry);
  metrics->scored_tokens_ = &prometheus::BuildCounter()
                                 .Name("lmhead_scored_tokens_total")
                                 .Help("Positions whose label counted in the loss")
                                 .Register(registry);
  metrics->durations_ = &prometheus::BuildHistogram()
                             .Name("lmhead_request_duration_us")
                             .Help(
                                 "Time of a forward's phases in microseconds: decode, queue, "
                                 "compute (with the copies to and from the device), encode")
                             .Register(registry);
  metrics->batch_size_ =
      &prometheus::BuildHistogram()
           .Name("lmhead_batch_size")
           .Help("Calls packed into one forward (dynamic batching)")
           .Register(registry)
           .Add({}, prometheus::Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256});
  metrics->gauges_ = std::make_shared<GaugeCollector>(std::move(gauges));
  const std::string address = HostPort(host, port);
  try {
    metrics->exposer_ = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception&) {
    return absl::UnavailableError(absl::StrCat("--metrics_port: cannot listen on ", address));
  }
  metrics->exposer_->RegisterCollectable(metrics->registry_);
  metrics->exposer_->RegisterCollectable(metrics->gauges_);
  const std::vector<int> ports = metrics->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(absl::StrCat("--metrics_port: cannot listen on ", address));
  }
  metrics->port_ = ports.front();
  return metrics;
}

Metrics::~Metrics() = default;

void Metrics::CountCall(absl::string_view method, absl::string_view model, absl::StatusCode code) {
  calls_
      ->Add({{"method", std::string(method)},
             {"model", std::string(model)},
             {"code", absl::StatusCodeToString(code)}})
      .Increment();
}

void Metrics::RecordForward(absl::string_view model, int64_t tokens, int64_t scored_tokens,
                            int64_t decode_us, int64_t queue_us, int64_t compute_us,
                            int64_t encode_us, int64_t batch_size) {
  const std::string name(model);
  tokens_->Add({{"model", name}}).Increment(static_cast<double>(tokens));
  scored_tokens_->Add({{"model", name}}).Increment(static_cast<double>(scored_tokens));
  for (const auto& [phase, us] : {std::pair<const char*, int64_t>{"decode", decode_us},
                                  {"queue", queue_us},
                                  {"compute", compute_us},
                                  {"encode", encode_us}}) {
    durations_->Add({{"model", name}, {"phase", phase}}, DurationBuckets())
        .Observe(static_cast<double>(us));
  }
  batch_size_->Observe(static_cast<double>(batch_size));
}

}  // namespace lmhead
