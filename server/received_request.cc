#include "server/received_request.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace lmhead {
namespace {

// Field numbers of lmhead.v1 (proto/lmhead/v1/lmhead.proto) and protobuf's wire types.
constexpr uint64_t kHiddenStatesField = v1::ForwardRequest::kHiddenStatesFieldNumber;
constexpr uint64_t kDataField = v1::Tensor::kDataFieldNumber;
constexpr uint64_t kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5;

void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

// Reads a message's bytes spread over pieces, front to back. Every read checks that its bytes
// are there; a read past the end fails and leaves the reader where it failed.
class PieceReader {
 public:
  explicit PieceReader(absl::Span<const absl::string_view> pieces) : pieces_(pieces) {
    for (const absl::string_view piece : pieces) size_ += piece.size();
  }

  uint64_t position() const { return position_; }
  uint64_t size() const { return size_; }

  // A varint of at most `max_bytes` bytes; its bytes are appended to `echo` when it is not null.
  bool Varint(uint64_t* value, std::string* echo, int max_bytes = 10) {
    *value = 0;
    for (int shift = 0; shift < 7 * max_bytes; shift += 7) {
      char byte;
      if (!Take(1, &byte, echo)) return false;
      const auto bits = static_cast<uint64_t>(static_cast<unsigned char>(byte));
      *value |= (bits & 0x7f) << shift;
      if ((bits & 0x80) == 0) return true;
    }
    return false;
  }

  // The next `n` bytes, appended to `echo` (skipped when null); `first` gets the first of them.
  bool Take(uint64_t n, char* first, std::string* echo) {
    if (n > size_ - position_) return false;
    while (n > 0) {
      const absl::string_view piece = pieces_[index_];
      const uint64_t here = std::min<uint64_t>(n, piece.size() - offset_);
      if (here > 0) {
        if (first != nullptr) {
          *first = piece[offset_];
          first = nullptr;
        }
        if (echo != nullptr) echo->append(piece.data() + offset_, here);
      }
      Advance(here);
      n -= here;
    }
    return true;
  }

  // The next `n` bytes as views into the pieces.
  bool Views(uint64_t n, std::vector<absl::string_view>* views) {
    if (n > size_ - position_) return false;
    while (n > 0) {
      const absl::string_view piece = pieces_[index_];
      const uint64_t here = std::min<uint64_t>(n, piece.size() - offset_);
      if (here > 0) views->push_back(piece.substr(offset_, here));
      Advance(here);
      n -= here;
    }
    return true;
  }

 private:
  void Advance(uint64_t n) {
    offset_ += n;
    position_ += n;
    while (index_ < pieces_.size() && offset_ == pieces_[index_].size()) {
      ++index_;
      offset_ = 0;
    }
  }

  absl::Span<const absl::string_view> pieces_;
  uint64_t size_ = 0;
  uint64_t position_ = 0;
  size_t index_ = 0;
  uint64_t offset_ = 0;
};

// A field's tag: at most 5 bytes, a value below 2^32 and a field number above 0, as protobuf
// reads them (the rest, protobuf decides).
bool ReadTag(PieceReader& reader, uint64_t* field, uint64_t* wire_type) {
  uint64_t tag;
  if (!reader.Varint(&tag, nullptr, 5) || tag > 0xffffffffu) return false;
  *field = tag >> 3;
  *wire_type = tag & 7;
  return *field != 0;
}

// The length of a length-delimited field that the scan removes or rewrites: at most 5 bytes and
// below 2^31 - 16, the sizes protobuf's parser takes (the rest, protobuf decides).
bool ReadLength(PieceReader& reader, uint64_t* length) {
  return reader.Varint(length, nullptr, 5) && *length <= 0x7fffffffu - 16;
}

// Copies the value of a field of `wire_type` to `echo` as it is, for fields kept in the
// message. Groups (wire types 3 and 4, deprecated) are not followed.
bool EchoValue(PieceReader& reader, uint64_t wire_type, uint64_t end, std::string* echo) {
  uint64_t length = 0;
  switch (wire_type) {
    case kVarint:
      return reader.Varint(&length, echo) && reader.position() <= end;
    case kFixed64:
      length = 8;
      break;
    case kFixed32:
      length = 4;
      break;
    case kLengthDelimited:
      if (!reader.Varint(&length, echo)) return false;
      break;
    default:
      return false;
  }
  return length <= end - std::min(end, reader.position()) && reader.Take(length, nullptr, echo);
}

// Scans a serialized ForwardRequest: `kept` gets its wire form without hidden_states.data,
// `data` the views of the last hidden_states.data. False when the wire form is one it does not
// follow; protobuf then decides.
bool Scan(PieceReader& reader, std::string* kept, DetachedData* data) {
  const uint64_t end = reader.size();
  while (reader.position() < end) {
    uint64_t field, wire_type;
    if (!ReadTag(reader, &field, &wire_type)) return false;
    AppendVarint(field << 3 | wire_type, kept);
    if (field != kHiddenStatesField || wire_type != kLengthDelimited) {
      if (!EchoValue(reader, wire_type, end, kept)) return false;
      continue;
    }
    // hidden_states: its fields but `data`, under a new length.
    uint64_t length;
    if (!ReadLength(reader, &length) || length > end - reader.position()) return false;
    const uint64_t tensor_end = reader.position() + length;
    std::string tensor;
    while (reader.position() < tensor_end) {
      uint64_t inner_field, inner_type;
      if (!ReadTag(reader, &inner_field, &inner_type)) return false;
      if (inner_field == kDataField && inner_type == kLengthDelimited) {
        uint64_t size;
        if (!ReadLength(reader, &size) || reader.position() > tensor_end ||
            size > tensor_end - reader.position()) {
          return false;
        }
        data->parts.clear();  // the last occurrence wins, as in protobuf's parse
        data->size = size;
        if (!reader.Views(size, &data->parts)) return false;
        continue;
      }
      AppendVarint(inner_field << 3 | inner_type, &tensor);
      if (!EchoValue(reader, inner_type, tensor_end, &tensor)) return false;
    }
    if (reader.position() != tensor_end) return false;
    AppendVarint(tensor.size(), kept);
    kept->append(tensor);
  }
  return true;
}

absl::Status NotAForwardRequest() {
  return absl::InvalidArgumentError(
      absl::StrCat("request: not a valid ", v1::ForwardRequest::default_instance().GetTypeName(),
                   " message (the protobuf wire format could not be parsed)"));
}

}  // namespace

void GatherDetachedData(const DetachedData& data, void* destination, uint64_t begin, uint64_t end) {
  end = std::min(end, data.size);
  auto* out = static_cast<char*>(destination);
  uint64_t offset = 0;  // of the part in the data
  for (const absl::string_view part : data.parts) {
    const uint64_t part_end = offset + part.size();
    if (part_end > begin && offset < end) {
      const uint64_t from = std::max(begin, offset);
      const uint64_t to = std::min(end, part_end);
      std::memcpy(out + from, part.data() + (from - offset), to - from);
    }
    if (part_end >= end) break;
    offset = part_end;
  }
}

absl::Status ParseForwardRequest(absl::Span<const absl::string_view> pieces,
                                 v1::ForwardRequest* message, DetachedData* hidden_states_data) {
  *hidden_states_data = DetachedData();
  std::string kept;
  PieceReader reader(pieces);
  if (Scan(reader, &kept, hidden_states_data)) {
    if (!message->ParseFromString(kept)) return NotAForwardRequest();
    return absl::OkStatus();
  }
  *hidden_states_data = DetachedData();
  std::string whole;
  for (const absl::string_view piece : pieces) whole.append(piece.data(), piece.size());
  if (!message->ParseFromString(whole)) return NotAForwardRequest();
  return absl::OkStatus();
}

absl::Status ReceivedForwardRequest::Parse(const grpc::ByteBuffer& buffer) {
  slices_.clear();
  parse_failed_ = true;
  if (!buffer.Dump(&slices_).ok()) return NotAForwardRequest();
  std::vector<absl::string_view> pieces;
  pieces.reserve(slices_.size());
  for (const grpc::Slice& slice : slices_) {
    pieces.emplace_back(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  absl::Status status = ParseForwardRequest(pieces, &message_, &hidden_states_data_);
  parse_failed_ = !status.ok();
  if (hidden_states_data() == nullptr) slices_.clear();  // nothing refers to them
  return status;
}

}  // namespace lmhead

namespace grpc {

Status SerializationTraits<lmhead::ReceivedForwardRequest, void>::Deserialize(
    ByteBuffer* buffer, lmhead::ReceivedForwardRequest* request) {
  const absl::Status status = request->Parse(*buffer);
  buffer->Clear();
  if (status.ok()) return Status::OK;
  return Status(StatusCode::INVALID_ARGUMENT, std::string(status.message()));
}

}  // namespace grpc
