// Which instruction sets this CPU and OS run: CPUID for the CPU, XGETBV for the register state the OS saves, and
// (AMX) Linux's permission for the tile data, asked for once per process.
#include <cpuid.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels.h"

namespace edgellm {
namespace {

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

struct Features {
  bool avx2 = false, avx512 = false, amx = false;
  Features() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
    if (!osxsave) return;
    const uint64_t xcr0 = xgetbv0();
    const bool ymm_state = (xcr0 & 0x6) == 0x6;            // SSE and AVX registers saved by the OS
    const bool zmm_state = ymm_state && (xcr0 & 0xe0) == 0xe0;  // opmask, upper zmm halves, zmm16..31
    const bool tile_state = (xcr0 & 0x60000) == 0x60000;      // XTILECFG and XTILEDATA
    if (__get_cpuid_max(0, nullptr) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    const bool has_avx2 = b & (1u << 5), bw = b & (1u << 30), dq = b & (1u << 17), vl = b & (1u << 31);
    const bool f = b & (1u << 16), vnni = c & (1u << 11);
    const bool amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25);
    avx2 = ymm_state && has_avx2 && fma && f16c;
    avx512 = avx2 && zmm_state && f && bw && dq && vl && vnni;
    amx = avx512 && tile_state && amx_tile && amx_int8;
  }
};

const Features& features() {
  static const Features f;
  return f;
}

}  // namespace

bool cpu_has(Isa isa) {
  switch (isa) {
    case kIsaAvx2: return features().avx2;
    case kIsaAvx512: return features().avx512;
#ifdef EDGELLM_AMX_EMULATION
    case kIsaAmx: return features().avx512;  // the tiles are emulated (amx_emulation.h)
#else
    case kIsaAmx: return features().amx && amx_enable();
#endif
    default: return false;
  }
}

Isa best_isa() {
  if (cpu_has(kIsaAmx)) return kIsaAmx;
  if (cpu_has(kIsaAvx512)) return kIsaAvx512;
  if (cpu_has(kIsaAvx2)) return kIsaAvx2;
  return kIsaNone;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case kIsaAvx2: return "avx2";
    case kIsaAvx512: return "avx512-vnni";
#ifdef EDGELLM_AMX_EMULATION
    case kIsaAmx: return "amx-int8 (emulated)";
#else
    case kIsaAmx: return "amx-int8";
#endif
    default: return "none";
  }
}

bool amx_enable() {
  // Linux keeps AMX's 8 KiB of tile data out of a process's saved state until it asks (arch_prctl
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA); a tile instruction before that raises SIGILL.
  static const bool granted = [] {
    if (!features().amx) return false;
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

}  // namespace edgellm
