#include "server/received_request.h"

#include <google/protobuf/util/message_differencer.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace lmhead {
namespace {

using google::protobuf::util::MessageDifferencer;

// What protobuf's own parse of `wire` gives: ok, and the message.
struct Expected {
  bool ok = false;
  v1::ForwardRequest message;
};

Expected ProtobufParse(const std::string& wire) {
  Expected expected;
  expected.ok = expected.message.ParseFromString(wire);
  return expected;
}

std::string Concatenated(const DetachedData& data) {
  std::string bytes(data.size, '\0');
  GatherDetachedData(data, bytes.data());
  return bytes;
}

// Parses `wire` cut at `cuts` and checks the result against protobuf's parse: same verdict, same
// message once the detached data is put back, and the data detached when it is not empty.
void ExpectSameAsProtobuf(const std::string& wire, const std::vector<size_t>& cuts) {
  std::vector<absl::string_view> pieces;
  size_t start = 0;
  for (const size_t cut : cuts) {
    pieces.push_back(absl::string_view(wire).substr(start, cut - start));
    start = cut;
  }
  pieces.push_back(absl::string_view(wire).substr(start));
  const Expected expected = ProtobufParse(wire);
  v1::ForwardRequest message;
  DetachedData data;
  const absl::Status status = ParseForwardRequest(pieces, &message, &data);
  ASSERT_EQ(status.ok(), expected.ok) << status;
  if (!status.ok()) {
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(status.message(),
              "request: not a valid lmhead.v1.ForwardRequest message (the protobuf wire format "
              "could not be parsed)");
    return;
  }
  if (data.size > 0) {
    EXPECT_TRUE(message.hidden_states().data().empty());
    message.mutable_hidden_states()->set_data(Concatenated(data));
  }
  EXPECT_TRUE(MessageDifferencer::Equals(message, expected.message))
      << message.ShortDebugString() << "\nvs\n"
      << expected.message.ShortDebugString();
}

v1::ForwardRequest SampleRequest(int64_t tokens, uint32_t seed) {
  std::mt19937 random(seed);
  v1::ForwardRequest request;
  request.set_model("demo");
  v1::Tensor* x = request.mutable_hidden_states();
  x->set_dtype(v1::DATA_TYPE_BF16);
  x->add_shape(1);
  x->add_shape(tokens);
  x->add_shape(4);
  std::string data(static_cast<size_t>(tokens * 4 * 2), '\0');
  for (char& c : data) c = static_cast<char>(random());
  x->set_data(data);
  v1::Tensor* labels = request.mutable_labels();
  labels->set_dtype(v1::DATA_TYPE_INT64);
  labels->add_shape(1);
  labels->add_shape(tokens);
  labels->set_data(std::string(static_cast<size_t>(tokens * 8), '\1'));
  request.mutable_options()->set_return_logits(true);
  return request;
}

TEST(ParseForwardRequestTest, DetachesTheHiddenStatesAtEveryCut) {
  const std::string wire = SampleRequest(3, 1).SerializeAsString();
  ExpectSameAsProtobuf(wire, {});
  for (size_t cut = 0; cut <= wire.size(); ++cut) ExpectSameAsProtobuf(wire, {cut});
  for (size_t a = 0; a <= wire.size(); a += 3) {
    for (size_t b = a; b <= wire.size(); b += 5) ExpectSameAsProtobuf(wire, {a, b});
  }
}

TEST(ParseForwardRequestTest, KeepsViewsIntoThePiecesWithoutCopying) {
  const std::string wire = SampleRequest(4096, 2).SerializeAsString();
  std::vector<absl::string_view> pieces;
  for (size_t start = 0; start < wire.size(); start += 8192) {
    pieces.push_back(absl::string_view(wire).substr(start, 8192));
  }
  v1::ForwardRequest message;
  DetachedData data;
  ASSERT_TRUE(ParseForwardRequest(pieces, &message, &data).ok());
  ASSERT_EQ(data.size, 4096u * 4 * 2);
  EXPECT_GT(data.parts.size(), 1u);
  uint64_t total = 0;
  for (const absl::string_view part : data.parts) {
    EXPECT_GE(part.data(), wire.data());
    EXPECT_LE(part.data() + part.size(), wire.data() + wire.size());
    total += part.size();
  }
  EXPECT_EQ(total, data.size);
  EXPECT_EQ(Concatenated(data), SampleRequest(4096, 2).hidden_states().data());
  EXPECT_TRUE(message.hidden_states().data().empty());
  EXPECT_EQ(message.hidden_states().shape_size(), 3);
  EXPECT_EQ(message.labels().data().size(), 4096u * 8);
}

// Appends a field's tag.
void Tag(int field, int wire_type, std::string* out) {
  uint64_t tag = static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type);
  while (tag >= 0x80) {
    out->push_back(static_cast<char>((tag & 0x7f) | 0x80));
    tag >>= 7;
  }
  out->push_back(static_cast<char>(tag));
}

TEST(GatherDetachedDataTest, RangesMakeUpTheWhole) {
  const std::string bytes = "abcdefghijklmnopqrstuvwxyz";
  DetachedData data;
  for (const size_t length : {1, 0, 4, 7, 8, 6}) {  // an empty part too
    data.parts.push_back(absl::string_view(bytes).substr(data.size, length));
    data.size += length;
  }
  ASSERT_EQ(data.size, bytes.size());
  for (uint64_t begin = 0; begin <= data.size; ++begin) {
    for (uint64_t end = begin; end <= data.size + 1; ++end) {
      std::string out(data.size, '.');
      GatherDetachedData(data, out.data(), begin, end);
      std::string expected(data.size, '.');
      const uint64_t stop = std::min<uint64_t>(end, data.size);
      expected.replace(begin, stop - begin, bytes.substr(begin, stop - begin));
      EXPECT_EQ(out, expected) << begin << ".." << end;
    }
  }
}

TEST(ParseForwardRequestTest, RepeatedTensorsMergeAndTheLastDataWins) {
  v1::ForwardRequest first;
  first.mutable_hidden_states()->set_data("first");
  first.mutable_hidden_states()->set_dtype(v1::DATA_TYPE_FP32);
  v1::ForwardRequest second;
  second.mutable_hidden_states()->set_data("second!");
  second.mutable_hidden_states()->add_shape(7);
  v1::ForwardRequest empty_data;
  empty_data.set_model("m");
  std::string wire = first.SerializeAsString() + second.SerializeAsString();
  ExpectSameAsProtobuf(wire, {});
  ExpectSameAsProtobuf(wire, {wire.size() / 2});
  // Data, then a later hidden_states without data: the first data stays.
  wire = first.SerializeAsString() + empty_data.SerializeAsString();
  ExpectSameAsProtobuf(wire, {});
  // Two data fields in one tensor.
  std::string tensor;
  Tag(3, 2, &tensor);
  tensor += '\3';
  tensor += "abc";
  Tag(3, 2, &tensor);
  tensor += '\2';
  tensor += "de";
  wire.clear();
  Tag(2, 2, &wire);
  wire += static_cast<char>(tensor.size());
  wire += tensor;
  ExpectSameAsProtobuf(wire, {});
  ExpectSameAsProtobuf(wire, {4});
}

TEST(ParseForwardRequestTest, UnknownFieldsAndOtherWireTypesAreKept) {
  std::string wire;
  Tag(2, 2, &wire);  // hidden_states with an unknown varint, fixed32, fixed64 and data
  std::string tensor;
  Tag(99, 0, &tensor);
  tensor += "\x96\x01";
  Tag(98, 5, &tensor);
  tensor += "abcd";
  Tag(97, 1, &tensor);
  tensor += "abcdefgh";
  Tag(3, 2, &tensor);
  tensor += "\x04wxyz";
  Tag(3, 0, &tensor);  // `data` with a varint's wire type: an unknown field to protobuf
  tensor += '\x05';
  wire += static_cast<char>(tensor.size());
  wire += tensor;
  Tag(1000, 2, &wire);  // an unknown top-level field
  wire += "\x02hi";
  Tag(2, 0, &wire);  // hidden_states as a varint: unknown to protobuf too
  wire += '\x07';
  ExpectSameAsProtobuf(wire, {});
  for (size_t cut = 0; cut <= wire.size(); ++cut) ExpectSameAsProtobuf(wire, {cut});
}

TEST(ParseForwardRequestTest, MalformedInputIsRefusedAsProtobufRefusesIt) {
  const std::string good = SampleRequest(2, 3).SerializeAsString();
  std::vector<std::string> cases = {
      "",                                  // empty: a valid default message
      std::string("\x12", 1),              // hidden_states tag, no length
      std::string("\x12\x05\x1a\x09", 4),  // data longer than its tensor
      std::string("\x12\x02\x1a", 3),      // tensor longer than the message
      std::string("\x00\x01", 2),          // field number 0
      std::string("\x13\x14", 2),          // a group (wire type 3) and its end
      std::string("\x12\x02\x0b\x0c", 4),  // a group inside hidden_states
      std::string("\x12\x01\xff", 3),      // a varint cut off inside hidden_states
      std::string("\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 12),  // 11-byte varint
      std::string("\xff\xff\xff\xff\x7f\x00", 6),                           // tag over 2^32
  };
  for (size_t size = 0; size < good.size(); ++size) cases.push_back(good.substr(0, size));
  for (const std::string& wire : cases) {
    SCOPED_TRACE(testing::PrintToString(wire));
    ExpectSameAsProtobuf(wire, {});
    if (!wire.empty()) ExpectSameAsProtobuf(wire, {wire.size() / 2});
  }
}

TEST(ParseForwardRequestTest, RandomBytesGetProtobufsVerdict) {
  std::mt19937 random(7);
  const std::string good = SampleRequest(5, 4).SerializeAsString();
  for (int trial = 0; trial < 3000; ++trial) {
    std::string wire = good;
    for (int flips = 1 + trial % 4; flips > 0; --flips) {
      wire[random() % wire.size()] = static_cast<char>(random());
    }
    ExpectSameAsProtobuf(wire, {random() % (wire.size() + 1)});
  }
}

TEST(ReceivedForwardRequestTest, ParsesAByteBufferOfManySlices) {
  const v1::ForwardRequest request = SampleRequest(512, 5);
  const std::string wire = request.SerializeAsString();
  std::vector<grpc::Slice> slices;
  for (size_t start = 0; start < wire.size(); start += 1000) {
    slices.emplace_back(wire.data() + start, std::min<size_t>(1000, wire.size() - start));
  }
  const grpc::ByteBuffer buffer(slices.data(), slices.size());
  ReceivedForwardRequest received;
  ASSERT_TRUE(received.Parse(buffer).ok());
  EXPECT_FALSE(received.parse_failed());
  ASSERT_NE(received.hidden_states_data(), nullptr);
  EXPECT_EQ(Concatenated(*received.hidden_states_data()), request.hidden_states().data());
  v1::ForwardRequest message = received.message();
  message.mutable_hidden_states()->set_data(request.hidden_states().data());
  EXPECT_TRUE(MessageDifferencer::Equals(message, request));

  // gRPC's deserialisation hook: INVALID_ARGUMENT naming the message, and parse_failed().
  const std::string bad("\x12\x05\x1a", 3);
  grpc::Slice bad_slice(bad.data(), bad.size());
  grpc::ByteBuffer bad_buffer(&bad_slice, 1);
  const grpc::Status status =
      grpc::SerializationTraits<ReceivedForwardRequest>::Deserialize(&bad_buffer, &received);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(),
            "request: not a valid lmhead.v1.ForwardRequest message (the protobuf wire format "
            "could not be parsed)");
  EXPECT_TRUE(received.parse_failed());
}

TEST(ReceivedForwardRequestTest, DataOutlivesTheByteBuffer) {
  const v1::ForwardRequest request = SampleRequest(64, 6);
  const std::string wire = request.SerializeAsString();
  ReceivedForwardRequest received;
  {
    grpc::Slice slice(wire.data(), wire.size());
    grpc::ByteBuffer buffer(&slice, 1);
    ASSERT_TRUE(
        grpc::SerializationTraits<ReceivedForwardRequest>::Deserialize(&buffer, &received).ok());
  }  // the buffer is gone; the request holds its own references to the slices
  ASSERT_NE(received.hidden_states_data(), nullptr);
  EXPECT_EQ(Concatenated(*received.hidden_states_data()), request.hidden_states().data());
}

TEST(ReceivedForwardRequestTest, WithoutHiddenStatesNothingIsDetached) {
  v1::ForwardRequest request;
  request.set_model("demo");
  const std::string wire = request.SerializeAsString();
  grpc::Slice slice(wire.data(), wire.size());
  grpc::ByteBuffer buffer(&slice, 1);
  ReceivedForwardRequest received;
  ASSERT_TRUE(received.Parse(buffer).ok());
  EXPECT_EQ(received.hidden_states_data(), nullptr);
  EXPECT_EQ(received.message().model(), "demo");
}

}  // namespace
}  // namespace lmhead
