#include "client/lmhead_client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "proto/wire_dtype.h"

namespace lmhead {
namespace {

float HalfToFloat(uint16_t half) {
  const uint32_t sign = (half & 0x8000u) << 16;
  const uint32_t exponent = (half >> 10) & 0x1f;
  const uint32_t mantissa = half & 0x3ff;
  if (exponent == 0) {
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -value : value;
  }
  uint32_t bits = exponent == 0x1f ? (sign | 0x7f800000u | (mantissa << 13))
                                   : (sign | ((exponent + 112) << 23) | (mantissa << 13));
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The single value of a one-element floating tensor.
absl::StatusOr<double> ScalarValue(const v1::Tensor& tensor, absl::string_view field) {
  const std::string& data = tensor.data();
  switch (tensor.dtype()) {
    case v1::DATA_TYPE_FP32:
      if (data.size() == 4) {
        float value;
        std::memcpy(&value, data.data(), 4);
        return value;
      }
      break;
    case v1::DATA_TYPE_BF16:
      if (data.size() == 2) {
        uint32_t bits = 0;
        std::memcpy(reinterpret_cast<char*>(&bits) + 2, data.data(), 2);
        float value;
        std::memcpy(&value, &bits, 4);
        return value;
      }
      break;
    case v1::DATA_TYPE_FP16:
      if (data.size() == 2) {
        uint16_t half;
        std::memcpy(&half, data.data(), 2);
        return HalfToFloat(half);
      }
      break;
    default:
      break;
  }
  return absl::InternalError(absl::StrCat(field, ": expected a floating-point scalar"));
}

v1::Tensor Fp32Scalar(double value) {
  v1::Tensor tensor;
  tensor.set_dtype(v1::DATA_TYPE_FP32);
  const float f = static_cast<float>(value);
  tensor.set_data(std::string(reinterpret_cast<const char*>(&f), sizeof(f)));
  return tensor;
}

// Rows [begin, end) of `tensor` along dimension 0.
v1::Tensor SliceRows(const v1::Tensor& tensor, int64_t begin, int64_t end) {
  v1::Tensor out;
  out.set_dtype(tensor.dtype());
  int64_t row_bytes = ElementSize(tensor.dtype());
  for (int i = 1; i < tensor.shape_size(); ++i) row_bytes *= tensor.shape(i);
  out.add_shape(end - begin);
  for (int i = 1; i < tensor.shape_size(); ++i) out.add_shape(tensor.shape(i));
  out.set_data(tensor.data().substr(begin * row_bytes, (end - begin) * row_bytes));
  return out;
}

// Appends `part`'s rows to `whole` (same dtype and trailing dims).
void AppendRows(const v1::Tensor& part, v1::Tensor* whole) {
  if (whole->shape_size() == 0) {
    *whole = part;
    return;
  }
  whole->set_shape(0, whole->shape(0) + part.shape(0));
  whole->mutable_data()->append(part.data());
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

v1::ForwardRequest MakeForwardRequest(const v1::Tensor& hidden_states, const ForwardArgs& args) {
  v1::ForwardRequest request;
  request.set_model(args.model);
  *request.mutable_hidden_states() = hidden_states;
  if (args.labels.has_value()) *request.mutable_labels() = *args.labels;
  if (args.loss_implementation != v1::LOSS_IMPLEMENTATION_UNSPECIFIED) {
    request.mutable_config()->set_loss_implementation(args.loss_implementation);
  }
  if (args.compute_dtype != v1::DATA_TYPE_UNSPECIFIED) {
    request.mutable_config()->set_dtype(args.compute_dtype);
  }
  v1::ForwardOptions* options = request.mutable_options();
  if (args.ignore_index.has_value()) options->set_ignore_index(*args.ignore_index);
  options->set_loss_reduction(args.loss_reduction);
  if (args.z_loss_multiplier.has_value()) options->set_z_loss_multiplier(*args.z_loss_multiplier);
  if (const auto* value = std::get_if<double>(&args.loss_div_factor)) {
    options->set_loss_div_factor_value(*value);
  } else if (const auto* tensor = std::get_if<v1::Tensor>(&args.loss_div_factor)) {
    *options->mutable_loss_div_factor_tensor() = *tensor;
  }
  if (args.return_logits.has_value()) options->set_return_logits(*args.return_logits);
  if (const auto* count = std::get_if<int64_t>(&args.logits_to_keep)) {
    if (*count != 0) options->set_logits_to_keep_count(*count);
  } else {
    *options->mutable_logits_to_keep_positions() = std::get<v1::Tensor>(args.logits_to_keep);
  }
  options->set_logits_dtype(args.logits_dtype);
  if (args.fused_chunk_bytes.has_value()) options->set_fused_chunk_bytes(*args.fused_chunk_bytes);
  options->set_return_argmax(args.return_argmax);
  return request;
}

std::unique_ptr<LMHeadClient> LMHeadClient::Connect(const std::string& address,
                                                    ClientOptions options) {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(INT_MAX);
  arguments.SetMaxSendMessageSize(INT_MAX);
  return std::make_unique<LMHeadClient>(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), arguments),
      std::move(options));
}

LMHeadClient::LMHeadClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::LMHeadService::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

void LMHeadClient::Prepare(grpc::ClientContext* context) const {
  if (options_.timeout.count() > 0) {
    context->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  }
  if (!options_.request_id.empty()) context->AddMetadata("x-request-id", options_.request_id);
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::Forward(const v1::Tensor& hidden_states,
                                                          const ForwardArgs& args) {
  return Forward(MakeForwardRequest(hidden_states, args));
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::Forward(const v1::ForwardRequest& request) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ForwardResponse response;
  const grpc::Status status = stub_->Forward(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status LMHeadClient::ForwardStream(const NextRequest& next, const OnResponse& on_response,
                                         grpc::ClientContext* context) {
  grpc::ClientContext own_context;
  if (context == nullptr) context = &own_context;
  Prepare(context);
  std::unique_ptr<grpc::ClientReaderWriter<v1::ForwardRequest, v1::ForwardResponse>> stream =
      stub_->ForwardStream(context);
  std::thread writer([&]() {
    v1::ForwardRequest request;
    while (next(&request)) {
      if (!stream->Write(request)) return;  // the call ended (error or cancellation)
      request.Clear();
    }
    stream->WritesDone();
  });
  v1::ForwardResponse response;
  int64_t index = 0;
  bool cancelled_here = false;
  while (stream->Read(&response)) {
    if (!on_response(index++, response)) {
      context->TryCancel();
      cancelled_here = true;
      break;
    }
  }
  if (cancelled_here) {
    while (stream->Read(&response)) {
    }
  }
  writer.join();
  const grpc::Status status = stream->Finish();
  return FromGrpcStatus(status);
}

absl::StatusOr<v1::ForwardResponse> LMHeadClient::ForwardChunked(
    const v1::Tensor& hidden_states, const ForwardArgs& args, int64_t max_chunk_bytes,
    const std::function<void(int64_t, int64_t)>& progress) {
  if (hidden_states.shape_size() != 3) {
    return absl::InvalidArgumentError("hidden_states: expected (batch, seq_len, d_model)");
  }
  const v1::LossReduction reduction = args.loss_reduction == v1::LOSS_REDUCTION_UNSPECIFIED
                                          ? v1::LOSS_REDUCTION_MEAN
                                          : args.loss_reduction;
  const bool scalar_losses = reduction != v1::LOSS_REDUCTION_NONE;
  if (const auto* factor = std::get_if<v1::Tensor>(&args.loss_div_factor);
      factor != nullptr && (scalar_losses || factor->shape_size() >= 2)) {
    return absl::InvalidArgumentError(
        "loss_div_factor: a tensor cannot be split across micro-batches unless the reduction "
        "is none and it has rank < 2; divide the combined result instead");
  }
  const int64_t batch = hidden_states.shape(0);
  const int64_t row_bytes =
      std::max<int64_t>(hidden_states.data().size() / std::max<int64_t>(batch, 1), 1);
  const int64_t rows_per_chunk = std::max<int64_t>(max_chunk_bytes / row_bytes, 1);
  const int64_t chunks = batch == 0 ? 1 : (batch + rows_per_chunk - 1) / rows_per_chunk;

  // Per micro-batch: the same options, but sums (divided at the end) for mean/sum.
  ForwardArgs chunk_args = args;
  chunk_args.labels.reset();
  chunk_args.logits_to_keep = int64_t{0};
  if (scalar_losses) {
    chunk_args.loss_reduction = v1::LOSS_REDUCTION_SUM;
    chunk_args.loss_div_factor = std::monostate();
  }
  const v1::Tensor empty_hidden;
  v1::ForwardRequest base = MakeForwardRequest(empty_hidden, chunk_args);
  base.clear_hidden_states();

  int64_t sent = 0;
  const NextRequest next = [&](v1::ForwardRequest* request) {
    if (sent == chunks) return false;
    const int64_t begin = std::min(sent * rows_per_chunk, batch);
    const int64_t end = std::min(begin + rows_per_chunk, batch);
    *request = base;
    *request->mutable_hidden_states() = SliceRows(hidden_states, begin, end);
    if (args.labels.has_value()) *request->mutable_labels() = SliceRows(*args.labels, begin, end);
    if (const auto* count = std::get_if<int64_t>(&args.logits_to_keep); count && *count != 0) {
      request->mutable_options()->set_logits_to_keep_count(*count);
    } else if (const auto* positions = std::get_if<v1::Tensor>(&args.logits_to_keep)) {
      *request->mutable_options()->mutable_logits_to_keep_positions() =
          SliceRows(*positions, begin, end);
    }
    ++sent;
    return true;
  };

  v1::ForwardResponse combined;
  double loss = 0, ce_loss = 0, z_loss = 0;
  bool has_loss = false, has_z_loss = false;
  absl::Status failure;
  const OnResponse on_response = [&](int64_t index, const v1::ForwardResponse& response) {
    if (index == 0) {
      combined.set_model(response.model());
      combined.set_model_version(response.model_version());
    }
    if (response.has_logits()) AppendRows(response.logits(), combined.mutable_logits());
    if (response.has_argmax()) AppendRows(response.argmax(), combined.mutable_argmax());
    if (response.has_loss()) {
      has_loss = true;
      if (scalar_losses) {
        for (auto [field, tensor, sum] : {std::tuple{"loss", &response.loss(), &loss},
                                          std::tuple{"ce_loss", &response.ce_loss(), &ce_loss}}) {
          absl::StatusOr<double> value = ScalarValue(*tensor, field);
          if (!value.ok()) {
            failure = value.status();
            return false;
          }
          *sum += *value;
        }
      } else {
        AppendRows(response.loss(), combined.mutable_loss());
        AppendRows(response.ce_loss(), combined.mutable_ce_loss());
      }
    }
    if (response.has_z_loss()) {
      has_z_loss = true;
      if (scalar_losses) {
        absl::StatusOr<double> value = ScalarValue(response.z_loss(), "z_loss");
        if (!value.ok()) {
          failure = value.status();
          return false;
        }
        z_loss += *value;
      } else {
        AppendRows(response.z_loss(), combined.mutable_z_loss());
      }
    }
    combined.set_num_scored_tokens(combined.num_scored_tokens() + response.num_scored_tokens());
    combined.set_num_nonfinite_inputs(combined.num_nonfinite_inputs() +
                                      response.num_nonfinite_inputs());
    v1::ServerTimings* timings = combined.mutable_timings();
    timings->set_decode_us(timings->decode_us() + response.timings().decode_us());
    timings->set_compute_us(timings->compute_us() + response.timings().compute_us());
    timings->set_encode_us(timings->encode_us() + response.timings().encode_us());
    timings->set_total_us(timings->total_us() + response.timings().total_us());
    if (progress) progress(index + 1, chunks);
    return true;
  };
  absl::Status status = ForwardStream(next, on_response);
  if (!failure.ok()) return failure;
  if (!status.ok()) return status;

  if (scalar_losses && has_loss) {
    double divisor = 1.0;
    if (reduction == v1::LOSS_REDUCTION_MEAN) {
      divisor = static_cast<double>(combined.num_scored_tokens());  // 0 gives NaN, as upstream
    }
    if (const auto* factor = std::get_if<double>(&args.loss_div_factor)) divisor *= *factor;
    const auto finish = [&](double sum) { return divisor == 0.0 ? std::nan("") : sum / divisor; };
    *combined.mutable_loss() = Fp32Scalar(finish(loss));
    *combined.mutable_ce_loss() = Fp32Scalar(finish(ce_loss));
    if (has_z_loss) *combined.mutable_z_loss() = Fp32Scalar(finish(z_loss));
  }
  return combined;
}

absl::StatusOr<v1::ListModelsResponse> LMHeadClient::ListModels() {
  grpc::ClientContext context;
  Prepare(&context);
  v1::ListModelsResponse response;
  const grpc::Status status = stub_->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ModelInfo> LMHeadClient::GetModel(const std::string& name) {
  grpc::ClientContext context;
  Prepare(&context);
  v1::GetModelRequest request;
  request.set_name(name);
  v1::ModelInfo response;
  const grpc::Status status = stub_->GetModel(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<grpc::health::v1::HealthCheckResponse::ServingStatus> LMHeadClient::Health(
    const std::string& service) {
  grpc::ClientContext context;
  Prepare(&context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = health_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.status();
}

}  // namespace lmhead
