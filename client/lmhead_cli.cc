// lmhead: command-line client of the lmhead service.
//
//   lmhead health  --address HOST:PORT [--service NAME]
//   lmhead models  --address HOST:PORT [--json]
//   lmhead forward --address HOST:PORT --hidden FILE [--labels FILE] --output OUT.safetensors ...
//
// `lmhead <command> --help` lists a command's flags. Exit status: 0 success, 1 the server said
// no (or is not serving), 2 bad usage.
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/lmhead_client.h"
#include "client/tensor_file.h"
#include "client/tensor_view.h"
#include "proto/wire_dtype.h"

namespace lmhead {
namespace {

// Streams a streamed forward job is spread over when --parallel_streams is not given.
constexpr int kDefaultParallelStreams = 4;
// The largest ScoringOptions.top_k the service takes (lmhead.proto).
constexpr int kMaxTopK = 64;

struct Flag {
  std::string name;
  std::string value;  // the placeholder in --help; empty: a switch without a value
  std::string help;
  std::string default_value;
  // Set: this is the old name of flag `replaced_by`, kept for one release. Its value goes to
  // that flag, with a deprecation message on stderr; giving both with different values is an
  // error.
  std::string replaced_by;
};

// The old name `old_name` of `flag` (deprecated; removed in the next release).
Flag DeprecatedName(const std::string& old_name, const Flag& flag) {
  return {old_name, flag.value, absl::StrCat("deprecated: use --", flag.name), "", flag.name};
}

using Values = std::map<std::string, std::string>;

struct Command {
  std::string name;
  std::string summary;
  std::vector<Flag> flags;
  std::function<int(const Values&)> run;
};

void PrintCommandHelp(const Command& command, std::ostream& out) {
  out << "usage: lmhead " << command.name << " [flags]\n\n" << command.summary << "\n\nflags:\n";
  for (const Flag& flag : command.flags) {
    const std::string spelled = flag.value.empty() ? absl::StrCat("--", flag.name)
                                                   : absl::StrCat("--", flag.name, " ", flag.value);
    out << absl::StrFormat("  %-30s %s", spelled, flag.help);
    if (!flag.default_value.empty()) out << " (default " << flag.default_value << ")";
    out << "\n";
  }
  out << absl::StrFormat("  %-30s %s\n", "--help", "show this help");
}

void PrintUsage(const std::vector<Command>& commands, std::ostream& out) {
  out << "usage: lmhead <command> [flags]   (lmhead <command> --help for its flags)\n\n"
         "commands:\n";
  for (const Command& command : commands) {
    out << absl::StrFormat("  %-8s %s\n", command.name,
                           command.summary.substr(0, command.summary.find('\n')));
  }
}

// Parses --flag=value, --flag value and --switch; a deprecated name's value goes to its
// flag's. Returns false (after printing why) on error.
bool ParseFlags(const Command& command, int argc, char** argv, Values* values, bool* help) {
  for (const Flag& flag : command.flags) {
    if (!flag.default_value.empty()) (*values)[flag.name] = flag.default_value;
  }
  Values given;  // what the command line says, under the names it used
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      *help = true;
      return true;
    }
    if (!absl::StartsWith(arg, "--")) {
      std::cerr << "lmhead " << command.name << ": unexpected argument '" << arg << "'\n";
      return false;
    }
    arg = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    const Flag* flag = nullptr;
    for (const Flag& f : command.flags) {
      if (f.name == arg) flag = &f;
    }
    if (flag == nullptr) {
      std::cerr << "lmhead " << command.name << ": unknown flag --" << arg << " (see lmhead "
                << command.name << " --help)\n";
      return false;
    }
    if (flag->value.empty()) {
      (*values)[arg] = has_value ? value : "true";
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) {
        std::cerr << "lmhead " << command.name << ": --" << arg << " needs a value\n";
        return false;
      }
      value = argv[++i];
    }
    given[arg] = value;
    (*values)[arg] = value;
  }
  for (const Flag& flag : command.flags) {
    const auto old = given.find(flag.name);
    if (flag.replaced_by.empty() || old == given.end()) continue;
    std::cerr << "lmhead " << command.name << ": --" << flag.name << " is deprecated, use --"
              << flag.replaced_by << " (the old name goes in the next release)\n";
    if (const auto now = given.find(flag.replaced_by);
        now != given.end() && now->second != old->second) {
      std::cerr << "lmhead " << command.name << ": --" << flag.name << " " << old->second
                << " and --" << flag.replaced_by << " " << now->second << " disagree; give --"
                << flag.replaced_by << " alone\n";
      return false;
    }
    values->erase(flag.name);
    (*values)[flag.replaced_by] = old->second;
  }
  return true;
}

std::string Get(const Values& values, const std::string& name) {
  auto it = values.find(name);
  return it == values.end() ? "" : it->second;
}

// Prints `message` as a usage error and returns 2.
int UsageError(const std::string& command, const std::string& message) {
  std::cerr << "lmhead " << command << ": " << message << "\n";
  return 2;
}

int Failed(const absl::Status& status) {
  std::cerr << "error: " << absl::StatusCodeToString(status.code()) << ": " << status.message()
            << "\n";
  return 1;
}

// Failed for an input file given by --`flag`: the message names the flag.
int FailedInput(absl::string_view flag, const absl::Status& status) {
  return Failed(absl::Status(status.code(), absl::StrCat("--", flag, ": ", status.message())));
}

// The bearer token: the first non-empty line of --auth_token_file, else $LMHEAD_AUTH_TOKEN, else
// none.
absl::StatusOr<std::string> AuthToken(const Values& values) {
  const std::string path = Get(values, "auth_token_file");
  if (path.empty()) {
    const char* token = std::getenv("LMHEAD_AUTH_TOKEN");
    return std::string(token != nullptr ? absl::StripAsciiWhitespace(token) : "");
  }
  std::ifstream file(path);
  const bool opened = file.is_open();
  std::string line;
  while (std::getline(file, line)) {
    if (const absl::string_view token = absl::StripAsciiWhitespace(line); !token.empty()) {
      return std::string(token);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--auth_token_file: ", opened ? "the file has no token" : "cannot read the file"));
}

// The PEM text of the file that --`flag` names, else $`variable` names; empty when neither.
absl::StatusOr<std::string> PemFile(const Values& values, const std::string& flag,
                                    const char* variable) {
  std::string path = Get(values, flag);
  if (path.empty() && std::getenv(variable) != nullptr) path = std::getenv(variable);
  if (path.empty()) return std::string();
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  if (!file || !absl::StrContains(text.str(), "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read a PEM file at ", path,
                                                   " (from --", flag, " or $", variable, ")"));
  }
  return text.str();
}

// The connection flags of `command`: --address (checked: Connect takes it), --timeout,
// --max_attempts, --auth_token_file, --tls*.
absl::StatusOr<ClientOptions> ClientOptionsFrom(const Values& values) {
  if (absl::StatusOr<ChannelTarget> target = ChannelTargetOf(Get(values, "address"));
      !target.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--", target.status().message()));
  }
  ClientOptions options;
  absl::StatusOr<std::string> token = AuthToken(values);
  if (!token.ok()) return token.status();
  options.auth_token = *std::move(token);
  options.tls = Get(values, "tls") == "true";
  options.tls_server_name = Get(values, "tls_server_name");
  for (const auto& [flag, variable, pem] :
       {std::tuple{"tls_roots", "LMHEAD_TLS_ROOTS", &options.tls_root_certs},
        std::tuple{"tls_cert", "LMHEAD_TLS_CERT", &options.tls_cert_chain},
        std::tuple{"tls_key", "LMHEAD_TLS_KEY", &options.tls_private_key}}) {
    absl::StatusOr<std::string> text = PemFile(values, flag, variable);
    if (!text.ok()) return text.status();
    *pem = *std::move(text);
  }
  if (options.tls_cert_chain.empty() != options.tls_private_key.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert and --tls_key go together (from the flags or $LMHEAD_TLS_CERT and "
        "$LMHEAD_TLS_KEY)");
  }
  double seconds = 0;
  if (absl::SimpleAtod(Get(values, "timeout"), &seconds) && seconds > 0) {
    options.timeout = std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  }
  if (!absl::SimpleAtoi(Get(values, "max_attempts"), &options.max_attempts) ||
      options.max_attempts < 1 || options.max_attempts > 5) {
    return absl::InvalidArgumentError("--max_attempts: expected 1 to 5");
  }
  return options;
}

const Flag kAddress{"address", "HOST:PORT",
                    "the server to talk to (required); replicas: several IP:PORT separated by "
                    "commas, or one dns:///NAME:PORT, calls spread round-robin and retried on "
                    "another when one goes away",
                    ""};
const Flag kTls{"tls", "", "speak TLS (implied by the other --tls_* flags)", ""};
const Flag kTlsRoots{"tls_roots", "PATH",
                     "PEM bundle of the CAs the server's certificate must chain to (default: "
                     "$LMHEAD_TLS_ROOTS, else gRPC's default roots)",
                     ""};
const Flag kTlsCert{"tls_cert", "PATH",
                    "this client's certificate chain (PEM) for a mutual-TLS server (default: "
                    "$LMHEAD_TLS_CERT)",
                    ""};
const Flag kTlsKey{"tls_key", "PATH", "the key of --tls_cert (PEM; default: $LMHEAD_TLS_KEY)", ""};
const Flag kTlsServerName{"tls_server_name", "NAME",
                          "the name the server's certificate must hold (default: --address's "
                          "host; for several addresses the first one's)",
                          ""};
const Flag kAuthTokenFile{
    "auth_token_file", "PATH",
    "a file whose first non-empty line is the bearer token to send (for a server "
    "started with --auth_token_file); default: $LMHEAD_AUTH_TOKEN",
    ""};

const Flag kTimeout{"timeout", "SECONDS", "deadline of each call; 0 for none", "10"};
const Flag kMaxAttempts{"max_attempts", "N",
                        "attempts per call, 1-5: RESOURCE_EXHAUSTED and UNAVAILABLE are retried "
                        "with exponential backoff and jitter (a stream only before its first "
                        "answer); 1: no retry",
                        "5"};

// `flags` with the connection flags every command takes after them: --max_attempts, the token
// and TLS.
std::vector<Flag> WithConnection(std::vector<Flag> flags) {
  for (const Flag& flag :
       {kMaxAttempts, kAuthTokenFile, kTls, kTlsRoots, kTlsCert, kTlsKey, kTlsServerName}) {
    flags.push_back(flag);
  }
  return flags;
}

int RunHealth(const Values& values) {
  if (Get(values, "address").empty()) return UsageError("health", "--address is required");
  absl::StatusOr<ClientOptions> options = ClientOptionsFrom(values);
  if (!options.ok()) return UsageError("health", std::string(options.status().message()));
  auto client = LMHeadClient::Connect(Get(values, "address"), *options);
  auto status = client->Health(Get(values, "service"));
  if (!status.ok()) return Failed(status.status());
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*status) << "\n";
  return *status == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

int RunModels(const Values& values) {
  if (Get(values, "address").empty()) return UsageError("models", "--address is required");
  absl::StatusOr<ClientOptions> options = ClientOptionsFrom(values);
  if (!options.ok()) return UsageError("models", std::string(options.status().message()));
  auto client = LMHeadClient::Connect(Get(values, "address"), *options);
  auto models = client->ListModels();
  if (!models.ok()) return Failed(models.status());
  if (Get(values, "json") == "true") {
    std::string json;
    google::protobuf::util::JsonPrintOptions options;
    options.add_whitespace = true;
    options.preserve_proto_field_names = true;
    (void)google::protobuf::util::MessageToJsonString(*models, &json, options);
    std::cout << json;
    return 0;
  }
  std::cout << absl::StrFormat("%-16s %-8s %-11s %-6s %-12s %-7s %s\n", "NAME", "D_MODEL",
                               "VOCAB_SIZE", "DTYPE", "NUM_PARAMS", "DEVICE", "VERSION");
  for (const v1::ModelInfo& model : models->models()) {
    std::cout << absl::StrFormat(
        "%-16s %-8d %-11d %-6s %-12d %-7s %s%s\n", model.name(), model.d_model(),
        model.vocab_size(), DataTypeName(model.dtype()), model.num_params(),
        // One entry per executor (ModelInfo.devices); servers before it report `device` only.
        model.devices().empty() ? model.device() : absl::StrJoin(model.devices(), ","),
        model.version(), model.name() == models->default_model() ? " (default)" : "");
  }
  return 0;
}

int RunLoadModel(const Values& values) {
  for (const char* required : {"address", "name", "path"}) {
    if (Get(values, required).empty()) {
      return UsageError("load-model", absl::StrCat("--", required, " is required"));
    }
  }
  absl::StatusOr<ClientOptions> options = ClientOptionsFrom(values);
  if (!options.ok()) return UsageError("load-model", std::string(options.status().message()));
  auto client = LMHeadClient::Connect(Get(values, "address"), *options);
  auto model =
      client->LoadModel(Get(values, "name"), Get(values, "path"), Get(values, "replace") == "true");
  if (!model.ok()) return Failed(model.status());
  std::cout << absl::StrFormat("loaded %s: d_model %d, vocab_size %d, %s, version %s\n",
                               model->name(), model->d_model(), model->vocab_size(),
                               DataTypeName(model->dtype()), model->version());
  return 0;
}

int RunUnloadModel(const Values& values) {
  for (const char* required : {"address", "name"}) {
    if (Get(values, required).empty()) {
      return UsageError("unload-model", absl::StrCat("--", required, " is required"));
    }
  }
  absl::StatusOr<ClientOptions> options = ClientOptionsFrom(values);
  if (!options.ok()) return UsageError("unload-model", std::string(options.status().message()));
  auto client = LMHeadClient::Connect(Get(values, "address"), *options);
  if (absl::Status status = client->UnloadModel(Get(values, "name")); !status.ok()) {
    return Failed(status);
  }
  std::cout << "unloaded " << Get(values, "name") << "\n";
  return 0;
}

template <typename Enum>
bool ParseEnum(const std::string& text, const std::map<std::string, Enum>& names, Enum* out) {
  auto it = names.find(text);
  if (it == names.end()) return false;
  *out = it->second;
  return true;
}

int RunForward(const Values& values) {
  const std::string command = "forward";
  for (const char* required : {"address", "hidden", "output"}) {
    if (Get(values, required).empty()) {
      return UsageError(command, absl::StrCat("--", required, " is required"));
    }
  }
  ForwardArgs args;
  args.model = Get(values, "model");
  const std::map<std::string, v1::DataType> dtypes = {
      {"bf16", v1::DATA_TYPE_BF16}, {"fp16", v1::DATA_TYPE_FP16}, {"fp32", v1::DATA_TYPE_FP32}};
  if (const std::string text = Get(values, "dtype");
      !text.empty() && !ParseEnum(text, dtypes, &args.compute_dtype)) {
    return UsageError(command, "--dtype: expected bf16, fp16 or fp32");
  }
  if (const std::string text = Get(values, "logits_dtype");
      !text.empty() && !ParseEnum(text, dtypes, &args.logits_dtype)) {
    return UsageError(command, "--logits_dtype: expected bf16, fp16 or fp32");
  }
  if (const std::string text = Get(values, "loss_reduction");
      !text.empty() &&
      !ParseEnum(text,
                 std::map<std::string, v1::LossReduction>{{"mean", v1::LOSS_REDUCTION_MEAN},
                                                          {"sum", v1::LOSS_REDUCTION_SUM},
                                                          {"none", v1::LOSS_REDUCTION_NONE}},
                 &args.loss_reduction)) {
    return UsageError(command, "--loss_reduction: expected mean, sum or none");
  }
  if (const std::string text = Get(values, "loss_implementation");
      !text.empty() && !ParseEnum(text,
                                  std::map<std::string, v1::LossImplementation>{
                                      {"default", v1::LOSS_IMPLEMENTATION_DEFAULT},
                                      {"fused_linear", v1::LOSS_IMPLEMENTATION_FUSED_LINEAR}},
                                  &args.loss_implementation)) {
    return UsageError(command, "--loss_implementation: expected default or fused_linear");
  }
  if (const std::string text = Get(values, "ignore_index"); !text.empty()) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(text, &value))
      return UsageError(command, "--ignore_index: not an integer");
    args.ignore_index = value;
  }
  if (const std::string text = Get(values, "z_loss_multiplier"); !text.empty()) {
    double value = 0;
    if (!absl::SimpleAtod(text, &value))
      return UsageError(command, "--z_loss_multiplier: not a number");
    args.z_loss_multiplier = value;
  }
  if (const std::string text = Get(values, "loss_div_factor"); !text.empty()) {
    double value = 0;
    if (!absl::SimpleAtod(text, &value))
      return UsageError(command, "--loss_div_factor: not a number");
    args.loss_div_factor = value;
  }
  if (const std::string text = Get(values, "return_logits"); !text.empty()) {
    if (text != "true" && text != "false") {
      return UsageError(command, "--return_logits: expected true or false");
    }
    args.return_logits = text == "true";
  }
  if (const std::string text = Get(values, "return_argmax"); !text.empty()) {
    if (text != "true" && text != "false") {
      return UsageError(command, "--return_argmax: expected true or false");
    }
    args.return_argmax = text == "true";
  }
  if (const std::string text = Get(values, "logits_to_keep"); !text.empty()) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(text, &value))
      return UsageError(command, "--logits_to_keep: not an integer");
    args.logits_to_keep = value;
  }
  // Scoring outputs (docs/API.md "Scoring").
  for (const auto& [name, asked] : {std::pair{"label_logprobs", &args.scoring.label_logprobs},
                                    std::pair{"entropy", &args.scoring.entropy},
                                    std::pair{"label_rank", &args.scoring.label_rank}}) {
    const std::string text = Get(values, name);
    if (!text.empty() && text != "true" && text != "false") {
      return UsageError(command,
                        absl::StrCat("--", name, ": a switch; give it alone or =true/=false"));
    }
    *asked = text == "true";
  }
  if (!absl::SimpleAtoi(Get(values, "top_k"), &args.scoring.top_k) || args.scoring.top_k < 0 ||
      args.scoring.top_k > kMaxTopK) {
    return UsageError(command, absl::StrCat("--top_k: expected an integer from 0 to ", kMaxTopK,
                                            ", got '", Get(values, "top_k"), "'"));
  }
  for (const char* file : {"candidate_ids", "segment_ids"}) {
    const std::string name_flag = absl::StrCat(file, "_name");
    if (!Get(values, name_flag).empty() && Get(values, file).empty()) {
      return UsageError(command, absl::StrCat("--", name_flag, ": needs --", file));
    }
  }
  const bool has_labels = !Get(values, "labels").empty();
  for (const auto& [flag, asked] :
       {std::pair{"label_logprobs", args.scoring.label_logprobs},
        std::pair{"label_rank", args.scoring.label_rank},
        std::pair{"segment_ids", !Get(values, "segment_ids").empty()}}) {
    if (asked && !has_labels) {
      return UsageError(command, absl::StrCat("--", flag, ": needs --labels"));
    }
  }
  double micro_batch_mib = 0;
  if (!absl::SimpleAtod(Get(values, "micro_batch_mib"), &micro_batch_mib) || micro_batch_mib < 0) {
    return UsageError(command, "--micro_batch_mib: expected a number >= 0");
  }
  // Unset: kDefaultParallelStreams for a streamed job (docs/API.md: 4 streams moved a 256 MiB
  // job 1.65 x faster than 1 on an H200 host, 8 and 16 little more).
  int parallel_streams = micro_batch_mib > 0 ? kDefaultParallelStreams : 1;
  if (const std::string given = Get(values, "parallel_streams");
      !given.empty() && (!absl::SimpleAtoi(given, &parallel_streams) || parallel_streams < 1)) {
    return UsageError(command, "--parallel_streams: expected an integer >= 1");
  }
  if (parallel_streams > 1 && micro_batch_mib == 0) {
    return UsageError(
        command, "--parallel_streams: needs --micro_batch_mib > 0 (with 0 the job is one request)");
  }

  // Read in place from read-only mappings of the files: the requests' hidden states are sent from
  // the mapping (SerializeForwardRequest), their labels copied into them.
  absl::StatusOr<TensorView> hidden =
      MapTensorFile(Get(values, "hidden"), Get(values, "hidden_name"));
  if (!hidden.ok()) return FailedInput("hidden", hidden.status());
  std::optional<TensorView> labels;
  if (!Get(values, "labels").empty()) {
    absl::StatusOr<TensorView> mapped =
        MapTensorFile(Get(values, "labels"), Get(values, "labels_name"));
    if (!mapped.ok()) return FailedInput("labels", mapped.status());
    labels = *std::move(mapped);
  }
  // The scoring's ids are read whole (one copy; ForwardMicroBatched copies each micro-batch's
  // rows).
  for (const auto& [file, ids] : {std::pair{"candidate_ids", &args.scoring.candidate_ids},
                                  std::pair{"segment_ids", &args.scoring.segment_ids}}) {
    if (Get(values, file).empty()) continue;
    absl::StatusOr<v1::Tensor> read =
        ReadTensorFile(Get(values, file), Get(values, absl::StrCat(file, "_name")));
    if (!read.ok()) return FailedInput(file, read.status());
    *ids = *std::move(read);
  }

  absl::StatusOr<ClientOptions> client_options = ClientOptionsFrom(values);
  if (!client_options.ok()) {
    return UsageError("forward", std::string(client_options.status().message()));
  }
  auto client = LMHeadClient::Connect(Get(values, "address"), *client_options);
  absl::StatusOr<v1::ForwardResponse> response;
  const auto max_micro_batch_bytes = static_cast<int64_t>(micro_batch_mib * (1 << 20));
  if (max_micro_batch_bytes == 0 ||
      static_cast<int64_t>(hidden->data.size()) <= max_micro_batch_bytes) {
    response = client->Forward(*hidden, labels, args);
  } else {
    const bool tty = isatty(STDERR_FILENO);
    response = client->ForwardMicroBatched(
        *hidden, labels, args, max_micro_batch_bytes,
        [tty](int64_t done, int64_t total) {
          constexpr int kWidth = 30;
          const int filled = static_cast<int>(kWidth * done / std::max<int64_t>(total, 1));
          std::cerr << (tty ? "\r" : "") << "[" << std::string(filled, '#')
                    << std::string(kWidth - filled, '.') << "] " << done << "/" << total
                    << " micro-batches" << (tty && done < total ? "" : "\n") << std::flush;
        },
        parallel_streams);
  }
  if (!response.ok()) return Failed(response.status());

  std::map<std::string, v1::Tensor> outputs;
  if (response->has_logits()) outputs["logits"] = response->logits();
  if (response->has_loss()) outputs["loss"] = response->loss();
  if (response->has_ce_loss()) outputs["ce_loss"] = response->ce_loss();
  if (response->has_z_loss()) outputs["z_loss"] = response->z_loss();
  if (response->has_argmax()) outputs["argmax"] = response->argmax();
  // The scoring outputs, under their ScoringOutputs field names (segment_is_greedy as BOOL).
  const google::protobuf::Reflection* reflection = response->scoring().GetReflection();
  std::vector<const google::protobuf::FieldDescriptor*> scoring_fields;
  reflection->ListFields(response->scoring(), &scoring_fields);
  for (const google::protobuf::FieldDescriptor* field : scoring_fields) {
    outputs[field->name()] =
        static_cast<const v1::Tensor&>(reflection->GetMessage(response->scoring(), field));
  }
  const std::map<std::string, std::string> metadata = {
      {"model", response->model()},
      {"model_version", response->model_version()},
      {"num_scored_tokens", absl::StrCat(response->num_scored_tokens())},
      {"num_nonfinite_inputs", absl::StrCat(response->num_nonfinite_inputs())}};
  if (absl::Status status = WriteSafetensorsFile(Get(values, "output"), outputs, metadata);
      !status.ok()) {
    return Failed(status);
  }
  std::cout << "model " << response->model() << " (" << response->model_version() << "); wrote";
  for (const auto& [name, tensor] : outputs) {
    std::cout << " " << name << "[";
    for (int i = 0; i < tensor.shape_size(); ++i) std::cout << (i ? "," : "") << tensor.shape(i);
    std::cout << "]";
  }
  std::cout << " to " << Get(values, "output") << "; " << response->num_scored_tokens()
            << " scored tokens\n";
  return 0;
}

const Flag kMicroBatchMib{"micro_batch_mib", "MIB",
                          "micro-batch size for streaming; 0 sends one request", "64"};

std::vector<Command> Commands() {
  return {
      {"health",
       "Asks the standard grpc.health.v1 service whether the server is SERVING; exits 0 if so.",
       WithConnection({
           kAddress,
           {"service", "NAME", "the service to ask about; empty: the whole server", ""},
           kTimeout,
       }),
       RunHealth},
      {"models",
       "Lists the loaded models (name, d_model, vocab_size, dtype, parameters, device, version).",
       WithConnection({
           kAddress,
           {"json", "", "print the full ListModels response as JSON", ""},
           kTimeout,
       }),
       RunModels},
      {"load-model",
       "Loads a model from the server's model repository while it serves (ModelAdminService).\n"
       "Needs an administrator's token (--auth_token_file with a token of the server's\n"
       "--admin_token_file). Prints the loaded model.",
       WithConnection({
           kAddress,
           {"name", "NAME", "the name calls will use (1-128 of [A-Za-z0-9._-])", ""},
           {"path", "PATH",
            "the .safetensors weights, relative to the server's --model_repository (the head's "
            "configuration: the .json beside them, else the server's --head_config)",
            ""},
           {"replace", "", "replace a loaded model of that name (its running calls finish)", ""},
           {"timeout", "SECONDS",
            "deadline of the call (reading large weights takes a while); 0 "
            "for none",
            "300"},
       }),
       RunLoadModel},
      {"unload-model",
       "Stops serving a model (ModelAdminService); calls already running on it finish.\n"
       "Needs an administrator's token, as load-model.",
       WithConnection({
           kAddress,
           {"name", "NAME", "the loaded model's name", ""},
           kTimeout,
       }),
       RunUnloadModel},
      {"forward",
       "Runs LMHead.forward on the server, from .npy/.safetensors inputs to a .safetensors file.\n"
       "Reads hidden states (and labels) from .npy or .safetensors, writes\n"
       "logits/loss/ce_loss/z_loss/argmax and the scoring outputs asked for (label_logprobs,\n"
       "entropy, label_rank, top_k_ids, top_k_logprobs, candidate_logprobs, segment_*) to a\n"
       ".safetensors file (metadata: model, model_version, num_scored_tokens,\n"
       "num_nonfinite_inputs). Inputs larger than --micro_batch_mib are streamed in micro-batches\n"
       "along the batch dimension, with a progress bar.\n"
       "Input files are memory-mapped, not read: gRPC sends the hidden states from the mapping\n"
       "(labels are copied into each request), in the file's dtype (bf16 stays bf16).",
       WithConnection({
           kAddress,
           {"hidden", "FILE",
            "(batch, seq_len, d_model) hidden states, .npy (<f2, <f4) or .safetensors (also bf16)",
            ""},
           {"hidden_name", "NAME", "tensor name inside a .safetensors --hidden file", ""},
           {"labels", "FILE", "(batch, seq_len) int64/int32 labels, .npy or .safetensors", ""},
           {"labels_name", "NAME", "tensor name inside a .safetensors --labels file", ""},
           {"output", "FILE", "where to write the outputs (.safetensors, required)", ""},
           {"model", "NAME", "model to use; empty: the server's default", ""},
           {"ignore_index", "INT", "label value that is not scored", "-100"},
           {"loss_reduction", "mean|sum|none", "how losses are reduced", "mean"},
           {"z_loss_multiplier", "X", "turns z-loss on with this multiplier", ""},
           {"loss_div_factor", "X", "divides loss, ce_loss and z_loss", ""},
           {"return_logits", "true|false", "whether logits are returned with the losses", ""},
           {"return_argmax", "true|false",
            "also write argmax: each position's most likely token id", "false"},
           {"logits_to_keep", "K", "0 all; K>0 the last K positions; K<0 drops the first |K|", ""},
           {"label_logprobs", "",
            "write label_logprobs: log p(label) per kept position, 0 where ignored (needs "
            "--labels)",
            ""},
           {"entropy", "", "write entropy: -sum p log p per kept position", ""},
           {"label_rank", "",
            "write label_rank: 1 + the tokens with a strictly larger logit than the label's, 0 "
            "where ignored (needs --labels)",
            ""},
           {"top_k", "K",
            "write top_k_ids and top_k_logprobs: the K (0-64) most likely tokens per kept "
            "position, by descending logit, then id",
            "0"},
           {"candidate_ids", "FILE",
            "int64/int32 token ids, (C,) for every kept position or (batch, kept, C): writes "
            "candidate_logprobs, their log-probabilities; .npy or .safetensors",
            ""},
           {"candidate_ids_name", "NAME", "tensor name inside a .safetensors --candidate_ids file",
            ""},
           {"segment_ids", "FILE",
            "(batch, seq_len) int64/int32 continuation ids like labels, -1 for none: writes "
            "segment_logprob_sums, _token_counts, _is_greedy, _entropy_sums (batch, G) (needs "
            "--labels); .npy or .safetensors",
            ""},
           {"segment_ids_name", "NAME", "tensor name inside a .safetensors --segment_ids file", ""},
           {"loss_implementation", "default|fused_linear",
            "override the model's loss implementation", ""},
           {"dtype", "bf16|fp16|fp32", "compute dtype override", ""},
           {"logits_dtype", "bf16|fp16|fp32", "dtype of the returned logits", ""},
           kMicroBatchMib,
           DeprecatedName("chunk_mib", kMicroBatchMib),
           {"parallel_streams", "N",
            "streams (and connections) a streamed job is spread over (default 4; 1 when the job is "
            "one request)",
            ""},
           {"timeout", "SECONDS", "deadline of the whole call; 0 for none", "0"},
       }),
       RunForward},
  };
}

}  // namespace
}  // namespace lmhead

int main(int argc, char** argv) {
  const std::vector<lmhead::Command> commands = lmhead::Commands();
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h" ||
      std::string(argv[1]) == "help") {
    lmhead::PrintUsage(commands, argc < 2 ? std::cerr : std::cout);
    return argc < 2 ? 2 : 0;
  }
  for (const lmhead::Command& command : commands) {
    if (command.name != argv[1]) continue;
    lmhead::Values values;
    bool help = false;
    if (!lmhead::ParseFlags(command, argc - 2, argv + 2, &values, &help)) return 2;
    if (help) {
      lmhead::PrintCommandHelp(command, std::cout);
      return 0;
    }
    return command.run(values);
  }
  std::cerr << "lmhead: unknown command '" << argv[1] << "'\n";
  lmhead::PrintUsage(commands, std::cerr);
  return 2;
}
