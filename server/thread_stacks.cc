// Thread stacks large enough for this process's static TLS (docs/notes/thread_stacks.md).
//
// glibc refuses to create a thread whose requested stack is smaller than the process's static
// TLS plus a little (pthread_create: EINVAL). The CUDA libraries LibTorch loads raise the static
// TLS to about 191 KiB, and Debian's civetweb, under prometheus-cpp's /metrics endpoint, asks
// for 100 KiB stacks: the endpoint could not start in a CUDA build. The server's executable
// therefore defines pthread_attr_setstacksize (exported, see server/BUILD), raising any stack
// smaller than kMinStackBytes to it and passing everything else on to glibc's unchanged.
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>

namespace {

constexpr size_t kMinStackBytes = size_t{1} << 20;

using SetStackSize = int (*)(pthread_attr_t*, size_t);

SetStackSize GlibcSetStackSize() {
  static const SetStackSize glibc =
      reinterpret_cast<SetStackSize>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return glibc;
}

}  // namespace

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t stack_size) {
  const SetStackSize glibc = GlibcSetStackSize();
  if (glibc == nullptr) return ENOSYS;
  return glibc(attr, std::max(stack_size, kMinStackBytes));
}
