// Same-host shared memory for tensors (docs/API.md "Shared memory"): the regions that clients
// register over SharedMemory sessions, mapped into the server, and every check around them. A
// region is a byte range of a POSIX shared-memory object mapped read-write, or, in CUDA builds
// (LMHEAD_WITH_CUDA), a CUDA allocation of the client's opened through CUDA IPC. Requests name a
// region by its id (128 random bits) and find it only on the connection (gRPC peer) whose
// session registered it, while that session is open. Free of gRPC, protobuf and LibTorch; error
// messages start with the SharedMemoryRequest field at fault ("register_system.key: ...").
#ifndef LMHEAD_SERVER_SHARED_MEMORY_SHARED_MEMORY_H_
#define LMHEAD_SERVER_SHARED_MEMORY_SHARED_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace lmhead {

// The longest shm_open key accepted, in bytes, the leading '/' included (NAME_MAX).
inline constexpr size_t kMaxShmKeyBytes = 255;
// Regions mapped in the process at once, over all sessions (the truncation guard's table).
inline constexpr int kMaxMappedRegions = 16384;

// True when the bytes [offset, offset + size) lie inside [0, total): computed without overflow,
// so an offset + size past 2^64 is outside, not wrapped around.
bool RangeInside(uint64_t offset, uint64_t size, uint64_t total);

// OK for a POSIX shared-memory key: "/name", one component (no further '/', not "." or ".."), no
// NUL byte, at most kMaxShmKeyBytes bytes. Else INVALID_ARGUMENT starting with `field`.
absl::Status ValidateShmKey(absl::string_view key, absl::string_view field);

// True for a gRPC peer address (grpc::ServerContext::peer()) on this host: "ipv4:127.*",
// "ipv6:[::1]*" (also percent-encoded, and IPv4-mapped loopback "ipv6:[::ffff:127.*"), "unix:*"
// and "unix-abstract:*". Note: a port forwarded to loopback (ssh -L, kubectl port-forward) looks
// local too.
bool IsLocalPeer(absl::string_view peer);

// A fresh region id: 32 lowercase hex digits of 128 bits from getrandom(2).
absl::StatusOr<std::string> NewRegionId();

// A registered region, mapped into this process: immutable, shared (std::shared_ptr) by the
// registry and every request that resolved it, and unmapped when the last of them lets go. Its
// bytes belong to the client, which may change them at any time: a reader copies what it must
// validate before validating it. Thread-safe.
class Region {
 public:
  enum class Kind { kSystem, kCuda };

  // `byte_size` bytes from `offset` of the POSIX shared-memory object `key` (shm_open), mapped
  // read-write (MAP_SHARED; from the page that holds `offset`). Checks the key, byte_size > 0,
  // and that the object is a regular one of at least offset + byte_size bytes (overflow-safe).
  // `pin`: also page-lock the mapping for CUDA copies (cudaHostRegister, portable to every
  // device; CUDA builds only), so that a device reads it by DMA without a staging copy; a region
  // that cannot be pinned is used unpinned (logged once). Pinning costs about as long as reading
  // the bytes once, at registration.
  static absl::StatusOr<std::unique_ptr<Region>> MapSystem(absl::string_view key, uint64_t offset,
                                                           uint64_t byte_size, bool pin = false);
  // The CUDA allocation whose cudaIpcMemHandle_t is `raw_handle` (64 bytes), opened on
  // `device_id` (cudaIpcOpenMemHandle, lazy peer access) after checking that the allocation
  // holds at least `byte_size` bytes from its base. UNIMPLEMENTED in builds without CUDA.
  static absl::StatusOr<std::unique_ptr<Region>> OpenCuda(absl::string_view raw_handle,
                                                          int device_id, uint64_t byte_size);

  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  Kind kind() const { return kind_; }
  // The region's first byte: host memory (kSystem), or memory of CUDA device `device()`.
  void* data() const { return data_; }
  // Its size in bytes (the registered byte_size).
  uint64_t size() const { return size_; }
  // The CUDA device index for kCuda; -1 for kSystem.
  int device() const { return device_; }
  // True when the mapping is page-locked for CUDA copies (MapSystem's `pin`).
  bool pinned() const { return pinned_; }
  // True once the client shrank the object below the region while it was mapped: the server's
  // accesses past the new end then found zero pages instead of crashing (see the truncation
  // guard in shared_memory.cc), and the region is unusable from then on.
  bool shrunk() const;

 private:
  Region(Kind kind, void* mapping, size_t mapping_bytes, void* data, uint64_t size, int device,
         int guard_slot, bool pinned = false);

  const Kind kind_;
  void* const mapping_;  // what munmap takes (kSystem); the IPC pointer (kCuda)
  const size_t mapping_bytes_;
  void* const data_;
  const uint64_t size_;
  const int device_;
  const int guard_slot_;  // kSystem: its entry in the truncation guard's table
  const bool pinned_;     // kSystem: cudaHostRegister'ed
};

// Every registered region of the server, by id; a server object like ModelRegistry, created
// when --allow_shared_memory is on. Registration happens through Sessions (one per SharedMemory
// call). Thread-safe; must outlive its sessions.
class RegionRegistry {
 public:
  // `max_regions_per_session`: --max_shared_memory_regions; `key_prefix`:
  // --shared_memory_key_prefix (POSIX objects whose key starts otherwise are PERMISSION_DENIED);
  // `pin_system`: POSIX regions are pinned (Region::MapSystem's `pin`).
  explicit RegionRegistry(int max_regions_per_session, std::string key_prefix = "",
                          bool pin_system = false);
  ~RegionRegistry();
  RegionRegistry(const RegionRegistry&) = delete;
  RegionRegistry& operator=(const RegionRegistry&) = delete;

  // The regions of one SharedMemory call from `peer`: it registers and unregisters them, and
  // unregisters all that remain when destroyed (the call ended for whatever reason). Used by one
  // thread at a time.
  class Session {
   public:
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    // A new region over a POSIX shared-memory object (Region::MapSystem); its id. Besides
    // MapSystem's errors: RESOURCE_EXHAUSTED when the session holds --max_shared_memory_regions
    // regions already; PERMISSION_DENIED when another live session has registered `key`.
    absl::StatusOr<std::string> RegisterSystem(absl::string_view key, uint64_t offset,
                                               uint64_t byte_size);
    // A new region over a CUDA allocation (Region::OpenCuda), with the same rules, the handle
    // taking the key's place.
    absl::StatusOr<std::string> RegisterCuda(absl::string_view raw_handle, int device_id,
                                             uint64_t byte_size);
    // Unregisters one of this session's regions; NOT_FOUND for any other id. Requests that
    // resolved it keep it mapped until they finish.
    absl::Status Unregister(absl::string_view id);

    // Regions this session holds.
    int regions() const { return static_cast<int>(ids_.size()); }

   private:
    friend class RegionRegistry;
    Session(RegionRegistry* registry, std::string peer);
    // Checks the limit, reserves `key` for this session, maps with `map` and files the region.
    absl::StatusOr<std::string> Register(
        const std::string& key, absl::string_view field,
        const std::function<absl::StatusOr<std::unique_ptr<Region>>()>& map);

    RegionRegistry* const registry_;
    const std::string peer_;
    std::set<std::string> ids_;  // the regions it registered and has not unregistered
  };

  std::unique_ptr<Session> OpenSession(std::string peer);

  // The region `id` for a request that came from `peer`. NOT_FOUND, "no region '<id>'
  // (unregistered, or its session ended)", both for an unknown id and for one registered from
  // another peer (the answer tells nothing of other clients' regions); FAILED_PRECONDITION
  // once the region's object shrank (Region::shrunk). The message names no field: the caller
  // puts the request's field in front.
  absl::StatusOr<std::shared_ptr<const Region>> Find(absl::string_view id,
                                                     absl::string_view peer) const;

  // Regions registered now, over all sessions.
  int size() const;

 private:
  struct Entry {
    std::shared_ptr<const Region> region;
    std::string peer;
    std::string key;
  };
  struct KeyOwner {
    const Session* session = nullptr;
    int regions = 0;  // the session's regions with this key, registered or being registered
  };

  // Releases one hold of `session` on `key`.
  void ReleaseKey(const std::string& key, const Session* session)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int max_regions_per_session_;
  const std::string key_prefix_;
  const bool pin_system_;
  mutable absl::Mutex mu_;
  std::map<std::string, Entry, std::less<>> regions_ ABSL_GUARDED_BY(mu_);  // by id
  std::map<std::string, KeyOwner> keys_ ABSL_GUARDED_BY(mu_);
};

}  // namespace lmhead

#endif  // LMHEAD_SERVER_SHARED_MEMORY_SHARED_MEMORY_H_
