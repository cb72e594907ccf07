// The cache dtypes: one table from torch's dtypes to the kernels' CacheDtype and the names errors print. The
// argument checks, the CPU host code and (through CacheDtype) the kernels all read it.
#pragma once

#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

#include "cpu/decode_attention.h"

namespace qwen_fused {

struct CacheDtypeEntry {
  c10::ScalarType scalar_type;
  CacheDtype cache_dtype;
  const char* name;  // as Python prints it, without "torch."
};

inline constexpr CacheDtypeEntry kCacheDtypes[] = {
    {c10::ScalarType::Float, CacheDtype::kFloat, "float32"},
    {c10::ScalarType::Half, CacheDtype::kHalf, "float16"},
    {c10::ScalarType::BFloat16, CacheDtype::kBFloat16, "bfloat16"},
    {c10::ScalarType::Float8_e4m3fn, CacheDtype::kFloat8E4M3, "float8_e4m3fn"},
    {c10::ScalarType::Float8_e5m2, CacheDtype::kFloat8E5M2, "float8_e5m2"},
};

// The kernels' name for a cache dtype; nullopt for a dtype no cache may have.
inline std::optional<CacheDtype> cache_dtype_of(c10::ScalarType t) {
  for (const CacheDtypeEntry& entry : kCacheDtypes)
    if (entry.scalar_type == t) return entry.cache_dtype;
  return std::nullopt;
}

inline const char* cache_dtype_name(CacheDtype dtype) {
  for (const CacheDtypeEntry& entry : kCacheDtypes)
    if (entry.cache_dtype == dtype) return entry.name;
  return "?";
}

// "float32, float16, bfloat16, float8_e4m3fn or float8_e5m2"
inline std::string cache_dtype_names() {
  std::string names;
  constexpr size_t count = sizeof(kCacheDtypes) / sizeof(kCacheDtypes[0]);
  for (size_t i = 0; i < count; ++i)
    names += std::string(i == 0 ? "" : i + 1 == count ? " or " : ", ") + kCacheDtypes[i].name;
  return names;
}

}  // namespace qwen_fused
