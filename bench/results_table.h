// Benchmarks' machine-readable tables (bench/results/README.md): each result row is appended as
// CSV to $LMHEAD_RESULTS/<table>.csv when the environment names a results directory (the GPU
// machine's tools/gpu/bench.sh does), with the column header first in a new file; without
// LMHEAD_RESULTS nothing is written. The card and commit come from LMHEAD_CARD and
// LMHEAD_COMMIT ("unknown" when unset), the date is the row's UTC time. bench/results_table.py
// writes the same columns from Python.
#ifndef LMHEAD_BENCH_RESULTS_TABLE_H_
#define LMHEAD_BENCH_RESULTS_TABLE_H_

#include <cmath>
#include <cstdint>
#include <string>

namespace lmhead {

// One row; numbers left NaN (or 0 for the shape) are written as empty fields.
struct ResultRow {
  int64_t d_model = 0;
  int64_t vocab_size = 0;
  int64_t tokens = 0;  // per call, job or forward
  std::string dtype;   // the hidden states' and weights' dtype, e.g. "bf16"
  std::string implementation;
  double time_ms = NAN;        // median time of one call (latency p50 under load)
  std::string baseline;        // the row of the same run `ratio` divides by
  double ratio = NAN;          // time / baseline's time, or tokens/s / baseline's tokens/s
  double peak_extra_mb = NAN;  // peak device memory above what was allocated before, 1e6 bytes
  double tokens_per_s = NAN;
  double p99_ms = NAN;  // latency p99 under load
};

// Appends `row` to the table (a file name without extension, e.g. "fused_linear_forward").
// Returns false, after a message on stderr, when the file cannot be written.
bool AppendResult(const std::string& table, const ResultRow& row);

}  // namespace lmhead

#endif  // LMHEAD_BENCH_RESULTS_TABLE_H_
