#include "client/wire_request.h"

#include <grpcpp/support/slice.h>

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmhead {
namespace {

// The buffer's bytes, and whether one of its slices starts at `at`.
std::string Bytes(const grpc::ByteBuffer& buffer, const char* at = nullptr,
                  bool* aliases = nullptr) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    if (aliases != nullptr && reinterpret_cast<const char*>(slice.begin()) == at) *aliases = true;
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes;
}

// A request with every field before and after hidden_states set.
v1::ForwardRequest FullRequest() {
  v1::ForwardRequest request;
  request.set_model("demo");
  request.mutable_labels()->set_dtype(v1::DATA_TYPE_INT64);
  request.mutable_labels()->add_shape(2);
  request.mutable_labels()->set_data(std::string(16, '\x05'));
  request.mutable_config()->set_dtype(v1::DATA_TYPE_BF16);
  request.mutable_options()->set_loss_reduction(v1::LOSS_REDUCTION_SUM);
  request.mutable_options()->set_logits_to_keep_count(1);
  return request;
}

TEST(WireRequestTest, BytesAreProtobufsAndAliasTheView) {
  auto file = std::make_shared<const std::string>(3000, '\x7f');  // stands in for a mapping
  TensorView view{v1::DATA_TYPE_BF16, {2, 3, 250}, *file, file};
  for (bool full : {true, false}) {
    SCOPED_TRACE(full);
    v1::ForwardRequest request = full ? FullRequest() : v1::ForwardRequest();
    v1::ForwardRequest expected = request;
    CopyTensorTo(view, expected.mutable_hidden_states());
    bool aliases = false;
    {
      const grpc::ByteBuffer buffer = SerializeForwardRequest(request, view);
      EXPECT_EQ(file.use_count(), 3);  // `view`, and the buffer's slice
      EXPECT_EQ(Bytes(buffer, file->data(), &aliases), expected.SerializeAsString());
      EXPECT_TRUE(aliases);
      v1::ForwardRequest parsed;
      ASSERT_TRUE(parsed.ParseFromString(Bytes(buffer)));
      EXPECT_EQ(parsed.hidden_states().data(), *file);
    }
    EXPECT_EQ(file.use_count(), 2);  // released with the buffer
  }
}

TEST(WireRequestTest, ViewsWithoutOwnerAreCopiedAndEmptyOnesLeftOut) {
  const std::string data(40, '\x11');
  v1::ForwardRequest request = FullRequest();
  request.mutable_hidden_states()->set_data("replaced");
  for (const TensorView& view :
       {TensorView{v1::DATA_TYPE_FP32, {1, 10}, data, nullptr},
        TensorView{v1::DATA_TYPE_FP32, {0, 10}, "", nullptr}, TensorView{}}) {
    v1::ForwardRequest expected = request;
    CopyTensorTo(view, expected.mutable_hidden_states());
    bool aliases = false;
    EXPECT_EQ(Bytes(SerializeForwardRequest(request, view), data.data(), &aliases),
              expected.SerializeAsString());
    EXPECT_FALSE(aliases);
  }
  // A long data field: multi-byte varints for the lengths.
  const std::string big(300000, '\x01');
  v1::ForwardRequest expected = request;
  const TensorView view{v1::DATA_TYPE_FP16, {150000}, big, nullptr};
  CopyTensorTo(view, expected.mutable_hidden_states());
  EXPECT_EQ(Bytes(SerializeForwardRequest(request, view)), expected.SerializeAsString());
}

}  // namespace
}  // namespace lmhead
