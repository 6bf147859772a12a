// parity_runner: runs our LMHead over the cases that tests/parity/test_parity.py generates, so
// the test can compare them with olmo_core.
//
//   parity_runner --cases CASES.json --results RESULTS.json [--device cuda:0]
//
// --device (default cpu) is where the head is built and computes: the weights and every input
// tensor (x, labels, positions, a divisor tensor) are moved there, as a caller of upstream's head
// on that device would; outputs are copied back to the CPU before they are written.
//
// CASES.json: {"cases": [{
//   "id": string,
//   "config": LMHeadConfig JSON (core/config_json.h),
//   "d_model": int, "vocab_size": int,
//   "weights": safetensors path, OLMo-core state-dict names,
//   "inputs": safetensors path with "x", optionally "labels", and the tensors that options
//             name "tensor": "logits_to_keep" ((B, K) int64) and "loss_div_factor",
//   "options": {"ignore_index": int, "loss_reduction": string, "z_loss_multiplier": null|number,
//               "loss_div_factor": null|number|"tensor", "return_logits": null|bool,
//               "logits_to_keep": int|"tensor", "loss_implementation": string (optional),
//               "logit_tile_bytes": int (optional)}   (missing = the forward defaults)
//   "output": safetensors path written with the outputs present (logits, loss, ce_loss, z_loss)
// }]}
//
// RESULTS.json: {id: {"ok": true} | {"ok": false, "code": "INVALID_ARGUMENT", "message": ...}}.
// A case that fails (in our head or in the runner) never stops the others; the exit status is
// non-zero only when CASES.json or RESULTS.json cannot be read or written.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <exception>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/config.h"
#include "core/config_json.h"
#include "core/lm_head.h"
#include "core/safetensors.h"

ABSL_FLAG(std::string, cases, "", "JSON file listing the cases to run");
ABSL_FLAG(std::string, results, "", "JSON file to write the per-case status to");
ABSL_FLAG(std::string, device, "cpu", "where the heads compute: cpu or cuda:N");

namespace lmhead {
namespace {

using Json = nlohmann::json;

// The tensor `name` of an inputs file, moved to `device`.
absl::StatusOr<at::Tensor> InputTensor(const SafetensorsFile& inputs, const std::string& name,
                                       const c10::Device& device) {
  auto it = inputs.tensors.find(name);
  if (it == inputs.tensors.end()) {
    return absl::InvalidArgumentError(absl::StrCat("runner: inputs have no tensor '", name, "'"));
  }
  return it->second.to(device);
}

// Builds ForwardOptions from the case's "options" and the inputs file (tensors on `device`).
absl::StatusOr<ForwardOptions> ReadOptions(const Json& options, const SafetensorsFile& inputs,
                                           const c10::Device& device) {
  ForwardOptions out;
  if (inputs.tensors.count("labels") > 0) out.labels = inputs.tensors.at("labels").to(device);
  out.ignore_index = options.value("ignore_index", out.ignore_index);

  absl::StatusOr<LossReduction> reduction =
      ParseLossReduction(options.value("loss_reduction", std::string("mean")));
  if (!reduction.ok()) return reduction.status();
  out.loss_reduction = *reduction;

  const Json z = options.value("z_loss_multiplier", Json());
  if (!z.is_null()) out.z_loss_multiplier = z.get<double>();

  const Json div = options.value("loss_div_factor", Json());
  if (div == "tensor") {
    absl::StatusOr<at::Tensor> tensor = InputTensor(inputs, "loss_div_factor", device);
    if (!tensor.ok()) return tensor.status();
    out.loss_div_factor = *tensor;
  } else if (!div.is_null()) {
    out.loss_div_factor = div.get<double>();
  }

  const Json return_logits = options.value("return_logits", Json());
  if (!return_logits.is_null()) out.return_logits = return_logits.get<bool>();

  const Json keep = options.value("logits_to_keep", Json(0));
  if (keep == "tensor") {
    absl::StatusOr<at::Tensor> tensor = InputTensor(inputs, "logits_to_keep", device);
    if (!tensor.ok()) return tensor.status();
    out.logits_to_keep = *tensor;
  } else {
    out.logits_to_keep = keep.get<int64_t>();
  }

  if (options.contains("loss_implementation")) {
    absl::StatusOr<LossImplementation> impl =
        ParseLossImplementation(options["loss_implementation"].get<std::string>());
    if (!impl.ok()) return impl.status();
    out.loss_implementation = *impl;
  }
  out.logit_tile_bytes = options.value("logit_tile_bytes", out.logit_tile_bytes);
  return out;
}

absl::Status RunCase(const Json& c, const std::string& device) {
  absl::StatusOr<LMHeadConfig> config = LMHeadConfigFromJson(c.at("config").dump());
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<LMHead>> head = LMHead::Build(
      *config, c.at("d_model").get<int64_t>(), c.at("vocab_size").get<int64_t>(), device);
  if (!head.ok()) return head.status();

  absl::StatusOr<SafetensorsFile> weights = ReadSafetensors(c.at("weights").get<std::string>());
  if (!weights.ok()) return weights.status();
  if (absl::Status s = (*head)->LoadStateDict(weights->tensors); !s.ok()) return s;

  absl::StatusOr<SafetensorsFile> inputs = ReadSafetensors(c.at("inputs").get<std::string>());
  if (!inputs.ok()) return inputs.status();
  const c10::Device on = (*head)->device();
  absl::StatusOr<at::Tensor> x = InputTensor(*inputs, "x", on);
  if (!x.ok()) return x.status();
  absl::StatusOr<ForwardOptions> options =
      ReadOptions(c.value("options", Json::object()), *inputs, on);
  if (!options.ok()) return options.status();

  absl::StatusOr<LMOutput> output = (*head)->Forward(*x, *options);
  if (!output.ok()) return output.status();

  std::map<std::string, at::Tensor> tensors;
  if (output->logits) tensors["logits"] = output->logits->cpu();
  if (output->loss) tensors["loss"] = output->loss->cpu();
  if (output->ce_loss) tensors["ce_loss"] = output->ce_loss->cpu();
  if (output->z_loss) tensors["z_loss"] = output->z_loss->cpu();
  return WriteSafetensors(c.at("output").get<std::string>(), tensors);
}

Json ResultJson(const absl::Status& status) {
  if (status.ok()) return Json{{"ok", true}};
  return Json{{"ok", false},
              {"code", absl::StatusCodeToString(status.code())},
              {"message", std::string(status.message())}};
}

int Main(const std::string& cases_path, const std::string& results_path,
         const std::string& device) {
  std::ifstream in(cases_path);
  Json cases = Json::parse(in, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (!in || cases.is_discarded() || !cases.contains("cases")) {
    std::cerr << "parity_runner: cannot read cases from '" << cases_path << "'\n";
    return 2;
  }

  Json results = Json::object();
  for (const Json& c : cases["cases"]) {
    const std::string id = c.value("id", std::string("?"));
    absl::Status status;
    try {
      status = RunCase(c, device);
    } catch (const std::exception& e) {  // a malformed case entry (nlohmann) or a stray throw
      status = absl::InternalError(absl::StrCat("runner: ", e.what()));
    }
    results[id] = ResultJson(status);
  }

  std::ofstream out(results_path);
  out << results.dump(1) << "\n";
  if (!out) {
    std::cerr << "parity_runner: cannot write results to '" << results_path << "'\n";
    return 2;
  }
  return 0;
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string cases = absl::GetFlag(FLAGS_cases);
  const std::string results = absl::GetFlag(FLAGS_results);
  if (cases.empty() || results.empty()) {
    std::cerr << "usage: parity_runner --cases CASES.json --results RESULTS.json [--device D]\n";
    return 2;
  }
  return lmhead::Main(cases, results, absl::GetFlag(FLAGS_device));
}
