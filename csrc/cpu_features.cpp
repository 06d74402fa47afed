// Run-time CPU feature detection: a SIMD translation unit is only entered when the CPU (and the OS) supports
// what it was compiled for.
//   x86-64: __builtin_cpu_supports (which checks the OS's XSAVE state too) and CPUID for F16C;
//   AArch64 Linux: the kernel's hwcaps (getauxval), which only advertise what the kernel enabled;
//   Apple silicon: sysctl hw.optional.arm.FEAT_*.
#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace lavin {

#if defined(__aarch64__) && defined(__APPLE__)
static bool sysctl_flag(const char* name) {
  int v = 0;
  size_t size = sizeof v;
  return sysctlbyname(name, &v, &size, nullptr, 0) == 0 && v != 0;
}
#endif

static CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) f.f16c = (ecx >> 29) & 1u;  // CPUID.1:ECX.F16C
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#elif defined(__aarch64__) && defined(__linux__)
  // Bit values from the kernel's uapi <asm/hwcap.h>, spelled out for older headers.
  const unsigned long hw = getauxval(AT_HWCAP);
  const unsigned long hw2 = getauxval(AT_HWCAP2);
  f.neon = (hw & (1ul << 1)) != 0;      // HWCAP_ASIMD
  f.fphp = (hw & (1ul << 9)) != 0;      // HWCAP_FPHP
  f.dotprod = (hw & (1ul << 20)) != 0;  // HWCAP_ASIMDDP
  f.i8mm = (hw2 & (1ul << 13)) != 0;    // HWCAP2_I8MM
#elif defined(__aarch64__) && defined(__APPLE__)
  f.neon = true;  // every Apple silicon core
  f.dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
  f.fphp = sysctl_flag("hw.optional.arm.FEAT_FP16");
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is part of the AArch64 baseline; the extensions stay off where we cannot ask
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect_cpu_features();
  return f;
}

std::vector<std::string> built_backends() {
  std::vector<std::string> b;
#ifdef LAVIN_EDGE_BUILD_X86
  b.push_back("avx512");
  b.push_back("avx2");
#endif
#ifdef LAVIN_EDGE_BUILD_NEON
  b.push_back("neon-i8mm");
  b.push_back("neon-dotprod");
  b.push_back("neon");
#endif
  b.push_back("scalar");
  return b;
}

static bool can_run(const std::string& name) {
  const CpuFeatures& f = cpu_features();
  if (name == "avx512") return f.can_avx512();
  if (name == "avx2") return f.can_avx2();
  if (name == "neon-i8mm") return f.can_neon_i8mm();
  if (name == "neon-dotprod") return f.can_neon_dotprod();
  if (name == "neon") return f.can_neon();
  return name == "scalar";
}

std::vector<std::string> usable_backends() {
  std::vector<std::string> u;
  for (const std::string& b : built_backends())
    if (can_run(b)) u.push_back(b);
  return u;
}

}  // namespace lavin
