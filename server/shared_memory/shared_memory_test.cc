#include "server/shared_memory/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmhead {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();

TEST(RangeInsideTest, BoundsWithoutOverflow) {
  EXPECT_TRUE(RangeInside(0, 0, 0));
  EXPECT_TRUE(RangeInside(0, 10, 10));
  EXPECT_TRUE(RangeInside(10, 0, 10));  // empty, at the end
  EXPECT_TRUE(RangeInside(3, 7, 10));
  EXPECT_FALSE(RangeInside(3, 8, 10));
  EXPECT_FALSE(RangeInside(11, 0, 10));  // an offset past the end
  EXPECT_FALSE(RangeInside(kMax, 1, kMax));
  // offset + size wraps around 2^64 to a small number: still outside.
  EXPECT_FALSE(RangeInside(kMax, 2, 10));
  EXPECT_FALSE(RangeInside(8, kMax - 7, 10));
  EXPECT_TRUE(RangeInside(kMax - 1, 1, kMax));
  EXPECT_TRUE(RangeInside(0, kMax, kMax));
}

TEST(ValidateShmKeyTest, OneComponentAfterASlash) {
  EXPECT_TRUE(ValidateShmKey("/lmhead_x", "key").ok());
  EXPECT_TRUE(ValidateShmKey("/" + std::string(kMaxShmKeyBytes - 1, 'a'), "key").ok());
  for (const std::string& bad :
       {std::string(""), std::string("/"), std::string("name"), std::string("/a/b"),
        std::string("//a"), std::string("/."), std::string("/.."), std::string("/a\0b", 4),
        "/" + std::string(kMaxShmKeyBytes, 'a')}) {
    const absl::Status status = ValidateShmKey(bad, "register_system.key");
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(status.message()), ::testing::StartsWith("register_system.key: "));
  }
}

TEST(IsLocalPeerTest, LoopbackAndUnixSocketsOnly) {
  for (const char* peer :
       {"ipv4:127.0.0.1:5000", "ipv4:127.1.2.3:1", "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000",
        "ipv6:[::ffff:127.0.0.1]:5000", "unix:/tmp/s", "unix:", "unix-abstract:lmhead"}) {
    EXPECT_TRUE(IsLocalPeer(peer)) << peer;
  }
  for (const char* peer : {"", "ipv4:10.0.0.1:5000", "ipv4:128.0.0.1:1", "ipv4:1127.0.0.1:1",
                           "ipv6:[::2]:5000", "ipv6:[::10]:1", "ipv6:[2001:db8::1]:1",
                           "ipv6:[::ffff:10.0.0.1]:1", "ipv4:192.168.0.1:127"}) {
    EXPECT_FALSE(IsLocalPeer(peer)) << peer;
  }
}

TEST(NewRegionIdTest, ThirtyTwoHexDigitsThatDiffer) {
  std::set<std::string> ids;
  for (int i = 0; i < 100; ++i) {
    absl::StatusOr<std::string> id = NewRegionId();
    ASSERT_TRUE(id.ok()) << id.status();
    EXPECT_EQ(id->size(), 32u);
    EXPECT_EQ(id->find_first_not_of("0123456789abcdef"), std::string::npos) << *id;
    ids.insert(*id);
  }
  EXPECT_EQ(ids.size(), 100u);
}

// A POSIX shared-memory object of the test's, unlinked when destroyed; `bytes` is the test's own
// mapping of all of it.
class ShmObject {
 public:
  explicit ShmObject(size_t size) : size_(size) {
    static int counter = 0;
    key_ = absl::StrCat("/lmhead_shm_test_", getpid(), "_", counter++);
    const int fd = shm_open(key_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    bytes_ =
        static_cast<unsigned char*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    EXPECT_NE(bytes_, MAP_FAILED);
    fd_ = fd;
  }
  ~ShmObject() {
    munmap(bytes_, size_);
    close(fd_);
    shm_unlink(key_.c_str());
  }
  const std::string& key() const { return key_; }
  unsigned char* bytes() { return bytes_; }
  void Truncate(off_t size) { ASSERT_EQ(ftruncate(fd_, size), 0); }

 private:
  std::string key_;
  size_t size_;
  int fd_ = -1;
  unsigned char* bytes_ = nullptr;
};

TEST(RegionTest, MapsTheRangeAtAnUnalignedOffsetBothWays) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ShmObject object(3 * page);
  for (size_t i = 0; i < 3 * page; ++i) object.bytes()[i] = static_cast<unsigned char>(i * 7);
  const uint64_t offset = page + 13;
  absl::StatusOr<std::unique_ptr<Region>> region = Region::MapSystem(object.key(), offset, 100);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ((*region)->kind(), Region::Kind::kSystem);
  EXPECT_EQ((*region)->size(), 100u);
  EXPECT_EQ((*region)->device(), -1);
  EXPECT_EQ(std::memcmp((*region)->data(), object.bytes() + offset, 100), 0);
  // Read-write and shared: what the server writes, the client sees.
  std::memset((*region)->data(), 0xAB, 100);
  EXPECT_EQ(object.bytes()[offset], 0xAB);
  EXPECT_EQ(object.bytes()[offset + 99], 0xAB);
  EXPECT_EQ(object.bytes()[offset + 100], static_cast<unsigned char>((offset + 100) * 7));
  EXPECT_FALSE((*region)->shrunk());
}

TEST(RegionTest, RefusesRangesPastTheObjectAndBadKeys) {
  ShmObject object(4096);
  EXPECT_TRUE(Region::MapSystem(object.key(), 0, 4096).ok());
  EXPECT_TRUE(Region::MapSystem(object.key(), 4095, 1).ok());
  const struct {
    std::string key;
    uint64_t offset;
    uint64_t size;
    absl::StatusCode code;
    std::string message;
  } cases[] = {
      {object.key(), 0, 4097, absl::StatusCode::kInvalidArgument,
       "register_system.byte_size: object '" + object.key() +
           "' holds 4096 bytes, fewer than offset 0 + byte_size 4097"},
      {object.key(), 4096, 1, absl::StatusCode::kInvalidArgument, "fewer than offset 4096"},
      {object.key(), kMax, 2, absl::StatusCode::kInvalidArgument,
       "register_system.byte_size: offset 18446744073709551615 + byte_size 2 is past the largest"},
      {object.key(), uint64_t{1} << 63, 1, absl::StatusCode::kInvalidArgument, "past the largest"},
      {object.key(), 0, 0, absl::StatusCode::kInvalidArgument,
       "register_system.byte_size: must be positive"},
      {"/lmhead_shm_test_no_such_object", 0, 1, absl::StatusCode::kNotFound,
       "register_system.key: no shared memory object '/lmhead_shm_test_no_such_object'"},
      {"/a/b", 0, 1, absl::StatusCode::kInvalidArgument, "register_system.key: expected"},
      {"/..", 0, 1, absl::StatusCode::kInvalidArgument, "register_system.key: expected"},
  };
  for (const auto& c : cases) {
    absl::StatusOr<std::unique_ptr<Region>> region = Region::MapSystem(c.key, c.offset, c.size);
    EXPECT_EQ(region.status().code(), c.code) << region.status();
    EXPECT_THAT(std::string(region.status().message()), HasSubstr(c.message));
  }
}

// Issue 13: a client that shrinks its object while the server reads or writes it must not crash
// the server (SIGBUS): the accesses find zero pages and the region reports it shrank.
TEST(RegionTest, AnObjectShrunkWhileMappedReadsZerosInsteadOfCrashing) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ShmObject object(4 * page);
  std::memset(object.bytes(), 0x5A, 4 * page);
  absl::StatusOr<std::unique_ptr<Region>> region = Region::MapSystem(object.key(), 10, 3 * page);
  ASSERT_TRUE(region.ok()) << region.status();
  auto* data = static_cast<volatile unsigned char*>((*region)->data());
  EXPECT_EQ(data[page], 0x5A);
  object.Truncate(static_cast<off_t>(page));
  EXPECT_EQ(data[0], 0x5A);  // still inside the object
  EXPECT_FALSE((*region)->shrunk());
  EXPECT_EQ(data[2 * page], 0);  // past its new end: would be SIGBUS
  data[2 * page + 1] = 7;        // a write there too
  EXPECT_EQ(data[2 * page + 1], 7);
  EXPECT_TRUE((*region)->shrunk());
  // Another region of another object is not affected.
  ShmObject other(page);
  absl::StatusOr<std::unique_ptr<Region>> fine = Region::MapSystem(other.key(), 0, page);
  ASSERT_TRUE(fine.ok());
  EXPECT_FALSE((*fine)->shrunk());
}

TEST(RegionTest, CudaNeedsACudaBuild) {
#ifndef LMHEAD_WITH_CUDA
  absl::StatusOr<std::unique_ptr<Region>> region = Region::OpenCuda(std::string(64, '\0'), 0, 1);
  EXPECT_EQ(region.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(region.status().message(),
            "register_cuda: CUDA shared memory needs a server built with CUDA");
#endif
}

constexpr char kPeerA[] = "ipv4:127.0.0.1:40001";
constexpr char kPeerB[] = "ipv4:127.0.0.1:40002";

TEST(RegionRegistryTest, RegistersOnlyKeysWithItsPrefix) {
  ShmObject object(4096);  // "/lmhead_shm_test_..."
  RegionRegistry other_prefix(4, "/elsewhere");
  std::unique_ptr<RegionRegistry::Session> refused = other_prefix.OpenSession(kPeerA);
  const absl::Status status = refused->RegisterSystem(object.key(), 0, 4096).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(status.message(),
            "register_system.key: this server registers only objects whose key starts with "
            "'/elsewhere' (--shared_memory_key_prefix)");
  EXPECT_EQ(other_prefix.size(), 0);
  RegionRegistry ours(4, "/lmhead");
  EXPECT_TRUE(ours.OpenSession(kPeerA)->RegisterSystem(object.key(), 0, 4096).ok());
}

TEST(RegionRegistryTest, FindsARegionOnlyForItsPeerAndNeverTellsWhichIdsExist) {
  ShmObject object(4096);
  RegionRegistry registry(4);
  std::unique_ptr<RegionRegistry::Session> session = registry.OpenSession(kPeerA);
  absl::StatusOr<std::string> id = session->RegisterSystem(object.key(), 0, 4096);
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(registry.size(), 1);
  absl::StatusOr<std::shared_ptr<const Region>> found = registry.Find(*id, kPeerA);
  ASSERT_TRUE(found.ok()) << found.status();
  EXPECT_EQ((*found)->size(), 4096u);
  // Another peer gets exactly what an unknown id gets.
  const absl::Status other = registry.Find(*id, kPeerB).status();
  EXPECT_EQ(other.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(other.message(),
            absl::StrCat("no region '", *id, "' (unregistered, or its session ended)"));
  const std::string unknown(32, '0');
  EXPECT_EQ(registry.Find(unknown, kPeerA).status().message(),
            absl::StrCat("no region '", unknown, "' (unregistered, or its session ended)"));
}

TEST(RegionRegistryTest, AKeyBelongsToOneLiveSession) {
  ShmObject object(4096);
  RegionRegistry registry(4);
  auto a = registry.OpenSession(kPeerA);
  auto b = registry.OpenSession(kPeerB);
  absl::StatusOr<std::string> first = a->RegisterSystem(object.key(), 0, 100);
  ASSERT_TRUE(first.ok()) << first.status();
  // The same session may register the key again (another range, or the same).
  absl::StatusOr<std::string> second = a->RegisterSystem(object.key(), 100, 100);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_NE(*first, *second);
  absl::StatusOr<std::string> theirs = b->RegisterSystem(object.key(), 0, 100);
  EXPECT_EQ(theirs.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(theirs.status().message(),
            "register_system.key: the object is registered by another client");
  // Free again once A holds no region of it.
  ASSERT_TRUE(a->Unregister(*first).ok());
  EXPECT_EQ(b->RegisterSystem(object.key(), 0, 100).status().code(),
            absl::StatusCode::kPermissionDenied);
  ASSERT_TRUE(a->Unregister(*second).ok());
  EXPECT_TRUE(b->RegisterSystem(object.key(), 0, 100).ok());
}

TEST(RegionRegistryTest, LimitPerSessionUnregisterAndSessionEnd) {
  ShmObject object(4096);
  RegionRegistry registry(2);
  auto session = registry.OpenSession(kPeerA);
  absl::StatusOr<std::string> one = session->RegisterSystem(object.key(), 0, 10);
  absl::StatusOr<std::string> two = session->RegisterSystem(object.key(), 10, 10);
  ASSERT_TRUE(one.ok() && two.ok());
  absl::StatusOr<std::string> three = session->RegisterSystem(object.key(), 20, 10);
  EXPECT_EQ(three.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(three.status().message()),
              HasSubstr("holds 2 regions, the most a session may (--max_shared_memory_regions)"));
  // Another session's ids cannot be unregistered from here.
  auto other = registry.OpenSession(kPeerA);
  EXPECT_EQ(other->Unregister(*one).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(other->Unregister("x").message(), "unregister: no region 'x' in this session");

  // A request that resolved a region keeps it mapped after it is unregistered.
  absl::StatusOr<std::shared_ptr<const Region>> held = registry.Find(*one, kPeerA);
  ASSERT_TRUE(held.ok());
  ASSERT_TRUE(session->Unregister(*one).ok());
  EXPECT_EQ(registry.Find(*one, kPeerA).status().code(), absl::StatusCode::kNotFound);
  std::memset((*held)->data(), 1, 10);  // still mapped
  EXPECT_EQ(object.bytes()[9], 1);
  EXPECT_EQ(session->regions(), 1);
  EXPECT_TRUE(session->RegisterSystem(object.key(), 20, 10).ok());

  // The end of a session unregisters what it holds.
  session.reset();
  EXPECT_EQ(registry.size(), 0);
  EXPECT_EQ(registry.Find(*two, kPeerA).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(other->RegisterSystem(object.key(), 0, 10).ok());
}

TEST(RegionRegistryTest, AFailedRegistrationHoldsNothing) {
  ShmObject object(4096);
  RegionRegistry registry(1);
  auto a = registry.OpenSession(kPeerA);
  EXPECT_FALSE(a->RegisterSystem(object.key(), 0, 8192).ok());
  EXPECT_EQ(a->regions(), 0);
  auto b = registry.OpenSession(kPeerB);
  EXPECT_TRUE(b->RegisterSystem(object.key(), 0, 4096).ok());  // A never held the key
}

TEST(RegionRegistryTest, AShrunkRegionIsRefused) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  ShmObject object(2 * page);
  RegionRegistry registry(1);
  auto session = registry.OpenSession(kPeerA);
  absl::StatusOr<std::string> id = session->RegisterSystem(object.key(), 0, 2 * page);
  ASSERT_TRUE(id.ok());
  absl::StatusOr<std::shared_ptr<const Region>> region = registry.Find(*id, kPeerA);
  ASSERT_TRUE(region.ok());
  object.Truncate(0);
  EXPECT_EQ(static_cast<volatile unsigned char*>((*region)->data())[page], 0);
  EXPECT_EQ(registry.Find(*id, kPeerA).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace lmhead
