// LMHEAD_FUZZ_CHECK: the fuzz targets' assertion. A failed check prints where and why, then
// aborts, which libFuzzer reports as a crash and saves the input for (docs/FUZZING.md).
#ifndef LMHEAD_TESTS_FUZZ_FUZZ_CHECK_H_
#define LMHEAD_TESTS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

// Unless `condition` holds, prints the printf-style message given after it and aborts.
#define LMHEAD_FUZZ_CHECK(condition, ...)                                               \
  do {                                                                                  \
    if (!(condition)) {                                                                 \
      std::fprintf(stderr, "%s:%d: LMHEAD_FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, \
                   #condition);                                                         \
      std::fprintf(stderr, __VA_ARGS__);                                                \
      std::fprintf(stderr, "\n");                                                       \
      std::abort();                                                                     \
    }                                                                                   \
  } while (false)

#endif  // LMHEAD_TESTS_FUZZ_FUZZ_CHECK_H_
