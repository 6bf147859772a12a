#include "server/shared_memory/shared_memory.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/logging.h"

#ifdef LMHEAD_WITH_CUDA
#include <cuda.h>  // CUresult and CUdeviceptr only: the driver is reached through the runtime
#include <cuda_runtime_api.h>

#include <optional>
#endif

namespace lmhead {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", message));
}

// ---- The truncation guard.
//
// A client may shrink its object (ftruncate) while the server has it mapped; the server's next
// access to a page past the new end would raise SIGBUS and kill the server, whatever thread made
// it (an executor reading hidden states in place, a copy of labels, an output being written).
// So a process-wide SIGBUS handler looks the faulting address up among the mapped regions and,
// when it lies in one, maps anonymous zero pages over the rest of that mapping (MAP_FIXED) and
// marks the region shrunk: the access is retried and completes, on memory the client no longer
// sees, and the request that used the region fails once it checks (Region::shrunk). This is what
// Wayland compositors do for clients' wl_shm pools. Any other SIGBUS goes where it went before.
//
// The table is read inside the signal handler, so it is a fixed array of atomics: an entry is
// in use while `begin` is non-zero. Entries are claimed and released under g_claim_mu, outside
// the handler; an entry is released before its mapping is unmapped. A fault at an address of a
// region means a thread is using the region, which therefore cannot be unmapped meanwhile.
struct GuardSlot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<bool> shrunk{false};
};

GuardSlot g_guard[kMaxMappedRegions];
std::mutex g_claim_mu;
struct sigaction g_previous_sigbus;
uintptr_t g_page_size = 4096;

void OnSigbus(int sig, siginfo_t* info, void* context) {
  if (info != nullptr && info->si_code > 0) {  // a fault (si_code <= 0: sent by kill and co.)
    const auto address = reinterpret_cast<uintptr_t>(info->si_addr);
    for (GuardSlot& slot : g_guard) {
      const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
      if (begin == 0 || address < begin) continue;
      const uintptr_t end = slot.end.load(std::memory_order_acquire);
      if (address >= end || slot.begin.load(std::memory_order_acquire) != begin) continue;
      const uintptr_t page = address & ~(g_page_size - 1);
      if (mmap(reinterpret_cast<void*>(page), end - page, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
        slot.shrunk.store(true, std::memory_order_release);
        return;
      }
      break;
    }
  }
  // Not a region's: what would have happened without this handler.
  if ((g_previous_sigbus.sa_flags & SA_SIGINFO) != 0 && g_previous_sigbus.sa_sigaction != nullptr) {
    g_previous_sigbus.sa_sigaction(sig, info, context);
    return;
  }
  if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN) {
    g_previous_sigbus.sa_handler(sig);
    return;
  }
  // The default action: the faulting access is retried and ends the process as it would have.
  struct sigaction default_action = {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  sigaction(SIGBUS, &default_action, nullptr);
  if (info == nullptr || info->si_code <= 0) raise(SIGBUS);
}

void InstallSigbusGuard() {
  static std::once_flag installed;
  std::call_once(installed, [] {
    g_page_size = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    struct sigaction action = {};
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous_sigbus);
  });
}

// An entry of the guard's table for [begin, end); -1 when the table is full.
int ClaimGuardSlot(uintptr_t begin, uintptr_t end) {
  InstallSigbusGuard();
  const std::lock_guard<std::mutex> lock(g_claim_mu);
  for (int i = 0; i < kMaxMappedRegions; ++i) {
    GuardSlot& slot = g_guard[i];
    if (slot.begin.load(std::memory_order_relaxed) != 0) continue;
    slot.shrunk.store(false, std::memory_order_relaxed);
    slot.end.store(end, std::memory_order_release);
    slot.begin.store(begin, std::memory_order_release);
    return i;
  }
  return -1;
}

void ReleaseGuardSlot(int index) {
  const std::lock_guard<std::mutex> lock(g_claim_mu);
  g_guard[index].begin.store(0, std::memory_order_release);
}

#ifdef LMHEAD_WITH_CUDA
// Makes a CUDA device current for its lifetime.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    cudaSetDevice(device);
  }
  ~CudaDeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// The bytes from `pointer` to the end of the allocation that holds it (cuMemGetAddressRange, got
// through the runtime's driver entry point so that the server links no libcuda); nullopt when
// the driver cannot tell.
std::optional<uint64_t> BytesToAllocationEnd(void* pointer) {
  using GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &entry, 12000, cudaEnableDefault,
                                       &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || entry == nullptr) {
    cudaGetLastError();
    return std::nullopt;
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  const auto address = reinterpret_cast<CUdeviceptr>(pointer);
  if (reinterpret_cast<GetAddressRange>(entry)(&base, &size, address) != CUDA_SUCCESS ||
      address < base || address - base > size) {
    return std::nullopt;
  }
  return static_cast<uint64_t>(base + size - address);
}
#endif  // LMHEAD_WITH_CUDA

}  // namespace

bool RangeInside(uint64_t offset, uint64_t size, uint64_t total) {
  uint64_t end = 0;
  return !__builtin_add_overflow(offset, size, &end) && end <= total;
}

absl::Status ValidateShmKey(absl::string_view key, absl::string_view field) {
  if (key.size() < 2 || key.front() != '/') {
    return Invalid(field,
                   absl::StrCat("expected a shm_open name \"/name\", got ", CallerText(key)));
  }
  if (key.size() > kMaxShmKeyBytes) {
    return Invalid(field,
                   absl::StrCat("a key is at most ", kMaxShmKeyBytes, " bytes, got ", key.size()));
  }
  const absl::string_view name = key.substr(1);
  if (absl::StrContains(name, '/') || absl::StrContains(name, '\0') || name == "." ||
      name == "..") {
    return Invalid(field, absl::StrCat("expected \"/name\", one component without '/' or NUL "
                                       "and not . or .., got ",
                                       CallerText(key)));
  }
  return absl::OkStatus();
}

bool IsLocalPeer(absl::string_view peer) {
  for (const absl::string_view prefix :
       {"ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D", "ipv6:[::ffff:127.", "ipv6:%5B::ffff:127.",
        "unix:", "unix-abstract:"}) {
    if (absl::StartsWith(peer, prefix)) return true;
  }
  return false;
}

absl::StatusOr<std::string> NewRegionId() {
  unsigned char bits[16];
  size_t filled = 0;
  while (filled < sizeof(bits)) {
    const ssize_t got = getrandom(bits + filled, sizeof(bits) - filled, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError("no random bytes for a region id (getrandom failed)");
    }
    filled += static_cast<size_t>(got);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bits), sizeof(bits)));
}

// ---- Region.

Region::Region(Kind kind, void* mapping, size_t mapping_bytes, void* data, uint64_t size,
               int device, int guard_slot, bool pinned)
    : kind_(kind),
      mapping_(mapping),
      mapping_bytes_(mapping_bytes),
      data_(data),
      size_(size),
      device_(device),
      guard_slot_(guard_slot),
      pinned_(pinned) {}

Region::~Region() {
  if (kind_ == Kind::kSystem) {
#ifdef LMHEAD_WITH_CUDA
    if (pinned_) {
      cudaHostUnregister(mapping_);
      cudaGetLastError();
    }
#endif
    ReleaseGuardSlot(guard_slot_);
    munmap(mapping_, mapping_bytes_);
    return;
  }
#ifdef LMHEAD_WITH_CUDA
  const CudaDeviceGuard on_device(device_);
  cudaIpcCloseMemHandle(mapping_);
  cudaGetLastError();
#endif
}

bool Region::shrunk() const {
  return guard_slot_ >= 0 && g_guard[guard_slot_].shrunk.load(std::memory_order_acquire);
}

absl::StatusOr<std::unique_ptr<Region>> Region::MapSystem(absl::string_view key, uint64_t offset,
                                                          uint64_t byte_size, bool pin) {
  if (absl::Status valid = ValidateShmKey(key, "register_system.key"); !valid.ok()) return valid;
  if (byte_size == 0) return Invalid("register_system.byte_size", "must be positive, got 0");
  uint64_t end = 0;
  if (__builtin_add_overflow(offset, byte_size, &end) ||
      end > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    return Invalid("register_system.byte_size",
                   absl::StrCat("offset ", offset, " + byte_size ", byte_size,
                                " is past the largest object size, 2^63 - 1 bytes"));
  }
  const std::string name(key);
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat("register_system.key: no shared memory object ", CallerText(key)));
    }
    if (errno == EACCES) {
      return absl::PermissionDeniedError(
          absl::StrCat("register_system.key: the server may not open ", CallerText(key),
                       " for reading and writing"));
    }
    return Invalid("register_system.key",
                   absl::StrCat("cannot open ", CallerText(key), " for reading and writing"));
  }
  struct stat info = {};
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    close(fd);
    return Invalid("register_system.key",
                   absl::StrCat(CallerText(key), " is not a regular shared memory object"));
  }
  if (static_cast<uint64_t>(info.st_size) < end) {
    close(fd);
    return Invalid("register_system.byte_size",
                   absl::StrCat("object ", CallerText(key), " holds ", info.st_size,
                                " bytes, fewer than offset ", offset, " + byte_size ", byte_size));
  }
  // mmap's offset must be a multiple of the page size: the mapping starts at the page that holds
  // `offset`, and the region inside it.
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t start = offset - offset % page;
  const size_t length = static_cast<size_t>(end - start);
  void* mapping =
      mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, static_cast<off_t>(start));
  const int mmap_errno = errno;
  close(fd);
  if (mapping == MAP_FAILED) {
    if (mmap_errno == ENOMEM) {
      return absl::ResourceExhaustedError(absl::StrCat("register_system: the server cannot map ",
                                                       byte_size, " more bytes (out of memory)"));
    }
    return Invalid("register_system.key", absl::StrCat(CallerText(key), " cannot be mapped"));
  }
  const auto begin = reinterpret_cast<uintptr_t>(mapping);
  const int slot = ClaimGuardSlot(begin, begin + length);
  if (slot < 0) {
    munmap(mapping, length);
    return absl::ResourceExhaustedError(
        absl::StrCat("register_system: the server maps ", kMaxMappedRegions,
                     " regions already, its most; retry once other clients' sessions end"));
  }
  bool pinned = false;
#ifdef LMHEAD_WITH_CUDA
  if (pin) {
    pinned = cudaHostRegister(mapping, length, cudaHostRegisterPortable) == cudaSuccess;
    if (!pinned) {
      const char* why = cudaGetErrorString(cudaGetLastError());
      static std::once_flag logged;
      std::call_once(logged, [&]() {
        LogWarning("", absl::StrCat("shared memory: a region could not be pinned for CUDA copies (",
                                    why, "); unpinned regions are staged through pinned memory"));
      });
    }
  }
#else
  (void)pin;
#endif
  return std::unique_ptr<Region>(new Region(Kind::kSystem, mapping, length,
                                            static_cast<char*>(mapping) + (offset - start),
                                            byte_size, /*device=*/-1, slot, pinned));
}

absl::StatusOr<std::unique_ptr<Region>> Region::OpenCuda(absl::string_view raw_handle,
                                                         int device_id, uint64_t byte_size) {
#ifndef LMHEAD_WITH_CUDA
  (void)raw_handle;
  (void)device_id;
  (void)byte_size;
  return absl::UnimplementedError(
      "register_cuda: CUDA shared memory needs a server built with CUDA");
#else
  if (raw_handle.size() != sizeof(cudaIpcMemHandle_t)) {
    return Invalid("register_cuda.raw_handle",
                   absl::StrCat("expected the ", sizeof(cudaIpcMemHandle_t),
                                " bytes of a cudaIpcMemHandle_t, got ", raw_handle.size()));
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    cudaGetLastError();
    devices = 0;
  }
  if (device_id < 0 || device_id >= devices) {
    return Invalid("register_cuda.device_id",
                   absl::StrCat("expected a CUDA device of this server, 0 to ", devices - 1,
                                ", got ", device_id));
  }
  if (byte_size == 0) return Invalid("register_cuda.byte_size", "must be positive, got 0");
  const CudaDeviceGuard on_device(device_id);
  cudaIpcMemHandle_t handle;
  std::memcpy(&handle, raw_handle.data(), sizeof(handle));
  void* pointer = nullptr;
  if (cudaIpcOpenMemHandle(&pointer, handle, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) {
    cudaGetLastError();
    return Invalid("register_cuda.raw_handle",
                   absl::StrCat("not the handle of a live CUDA allocation of another process that "
                                "device ",
                                device_id, " can open"));
  }
  const std::optional<uint64_t> available = BytesToAllocationEnd(pointer);
  if (!available.has_value() || *available < byte_size) {
    cudaIpcCloseMemHandle(pointer);
    cudaGetLastError();
    return Invalid("register_cuda.byte_size",
                   available.has_value()
                       ? absl::StrCat("the allocation holds ", *available,
                                      " bytes, fewer than byte_size ", byte_size)
                       : std::string("the allocation's size cannot be read, so byte_size cannot "
                                     "be checked"));
  }
  return std::unique_ptr<Region>(
      new Region(Kind::kCuda, pointer, 0, pointer, byte_size, device_id, /*guard_slot=*/-1));
#endif
}

// ---- RegionRegistry.

RegionRegistry::RegionRegistry(int max_regions_per_session, std::string key_prefix, bool pin_system)
    : max_regions_per_session_(max_regions_per_session),
      key_prefix_(std::move(key_prefix)),
      pin_system_(pin_system) {}

RegionRegistry::~RegionRegistry() = default;

std::unique_ptr<RegionRegistry::Session> RegionRegistry::OpenSession(std::string peer) {
  return std::unique_ptr<Session>(new Session(this, std::move(peer)));
}

absl::StatusOr<std::shared_ptr<const Region>> RegionRegistry::Find(absl::string_view id,
                                                                   absl::string_view peer) const {
  std::shared_ptr<const Region> region;
  {
    absl::MutexLock lock(&mu_);
    const auto it = regions_.find(id);
    if (it != regions_.end() && it->second.peer == peer) region = it->second.region;
  }
  if (region == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no region ", CallerText(id), " (unregistered, or its session ended)"));
  }
  if (region->shrunk()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "region ", CallerText(id),
        " is unusable: its shared memory object shrank below the region while the server used "
        "it; unregister it and register the object again"));
  }
  return region;
}

int RegionRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(regions_.size());
}

void RegionRegistry::ReleaseKey(const std::string& key, const Session* session) {
  const auto it = keys_.find(key);
  if (it == keys_.end() || it->second.session != session) return;
  if (--it->second.regions <= 0) keys_.erase(it);
}

RegionRegistry::Session::Session(RegionRegistry* registry, std::string peer)
    : registry_(registry), peer_(std::move(peer)) {}

RegionRegistry::Session::~Session() {
  // Unmapped here unless a running request still holds a region (it unmaps with the last one).
  std::vector<std::shared_ptr<const Region>> released;
  absl::MutexLock lock(&registry_->mu_);
  for (const std::string& id : ids_) {
    const auto it = registry_->regions_.find(id);
    if (it == registry_->regions_.end()) continue;
    registry_->ReleaseKey(it->second.key, this);
    released.push_back(std::move(it->second.region));
    registry_->regions_.erase(it);
  }
  ids_.clear();
  // `released` is destroyed after the lock (declared before it): munmap outside the mutex.
}

absl::StatusOr<std::string> RegionRegistry::Session::Register(
    const std::string& key, absl::string_view field,
    const std::function<absl::StatusOr<std::unique_ptr<Region>>()>& map) {
  if (regions() >= registry_->max_regions_per_session_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(field, ": this session holds ", regions(),
                     " regions, the most a session may (--max_shared_memory_regions); "
                     "unregister one first"));
  }
  {
    absl::MutexLock lock(&registry_->mu_);
    KeyOwner& owner = registry_->keys_[key];
    if (owner.session != nullptr && owner.session != this) {
      return absl::PermissionDeniedError(
          absl::StrCat(field, ": the object is registered by another client"));
    }
    owner.session = this;
    ++owner.regions;
  }
  absl::StatusOr<std::unique_ptr<Region>> region = map();
  absl::StatusOr<std::string> id = region.ok() ? NewRegionId() : region.status();
  absl::MutexLock lock(&registry_->mu_);
  if (!id.ok()) {
    registry_->ReleaseKey(key, this);
    return id.status();
  }
  registry_->regions_[*id] = Entry{std::shared_ptr<const Region>(*std::move(region)), peer_, key};
  ids_.insert(*id);
  return id;
}

absl::StatusOr<std::string> RegionRegistry::Session::RegisterSystem(absl::string_view key,
                                                                    uint64_t offset,
                                                                    uint64_t byte_size) {
  // The key is checked before it names anything (in the registry or a message).
  if (absl::Status valid = ValidateShmKey(key, "register_system.key"); !valid.ok()) return valid;
  if (!absl::StartsWith(key, registry_->key_prefix_)) {
    return absl::PermissionDeniedError(
        absl::StrCat("register_system.key: this server registers only objects whose key starts "
                     "with '",
                     registry_->key_prefix_, "' (--shared_memory_key_prefix)"));
  }
  return Register(absl::StrCat("system:", key), "register_system.key", [&]() {
    return Region::MapSystem(key, offset, byte_size, registry_->pin_system_);
  });
}

absl::StatusOr<std::string> RegionRegistry::Session::RegisterCuda(absl::string_view raw_handle,
                                                                  int device_id,
                                                                  uint64_t byte_size) {
#ifndef LMHEAD_WITH_CUDA
  return Region::OpenCuda(raw_handle, device_id, byte_size).status();  // UNIMPLEMENTED
#endif
  return Register(absl::StrCat("cuda:", absl::BytesToHexString(raw_handle)),
                  "register_cuda.raw_handle",
                  [&]() { return Region::OpenCuda(raw_handle, device_id, byte_size); });
}

absl::Status RegionRegistry::Session::Unregister(absl::string_view id) {
  const auto mine = ids_.find(std::string(id));
  if (mine == ids_.end()) {
    return absl::NotFoundError(
        absl::StrCat("unregister: no region ", CallerText(id), " in this session"));
  }
  std::shared_ptr<const Region> released;
  {
    absl::MutexLock lock(&registry_->mu_);
    const auto it = registry_->regions_.find(id);
    if (it != registry_->regions_.end()) {
      registry_->ReleaseKey(it->second.key, this);
      released = std::move(it->second.region);
      registry_->regions_.erase(it);
    }
  }
  ids_.erase(mine);
  return absl::OkStatus();
}

}  // namespace lmhead
