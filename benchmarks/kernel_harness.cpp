// The CPU attention kernel alone, without torch: times one kernel (attend_avx2 / attend_avx512 / attend_generic)
// on a paged cache with a shuffled block table, next to a streaming read of the same K/V bytes, both from a
// cold last-level cache, and checks the result against an fp64 reference. For kernel work (perf record/stat run
// on it directly); bench_op is the benchmark of record.
//
//   for k in generic avx2 avx512; do g++ -O3 -g -fopenmp -std=c++20 -I csrc/cpu -c csrc/cpu/kernel_$k.cpp -o /tmp/$k.o;
//   done g++ -O3 -g -fopenmp -std=c++20 -I csrc/cpu benchmarks/kernel_harness.cpp /tmp/{generic,avx2,avx512}.o -o
//   /tmp/harness /tmp/harness --dtype bf16 --batch 4 --len 2048 --new 1 --threads 2 --reps 9
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "decode_attention.h"

using namespace qwen_fused;

namespace {

struct Options {
  std::string dtype = "bf16";
  int64_t batch = 4, len = 2048, new_tokens = 1, threads = 2, reps = 9;
  int64_t num_heads = 40, num_kv_heads = 8, head_dim = 128, block_size = 128;
  std::string isa = "avx2";
  bool warm = false;
};

float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, 4);
  return out;
}
uint16_t float_to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}
// fp8 E4M3fn / E5M2 values in [-2, 2] by rounding a float down to the format's mantissa; decode is exact.
float e4m3_decode(uint8_t b) {
  const int sign = b >> 7, exponent = (b >> 3) & 15, mantissa = b & 7;
  const float magnitude = exponent ? std::ldexp(1.f + mantissa / 8.f, exponent - 7) : std::ldexp(mantissa / 8.f, -6);
  return sign ? -magnitude : magnitude;
}
float e5m2_decode(uint8_t b) {
  const int sign = b >> 7, exponent = (b >> 2) & 31, mantissa = b & 3;
  const float magnitude = exponent ? std::ldexp(1.f + mantissa / 4.f, exponent - 15) : std::ldexp(mantissa / 4.f, -14);
  return sign ? -magnitude : magnitude;
}

const AttentionKernel& kernel_named(const std::string& isa) {
  if (isa == "generic") return kGenericKernel;
  if (isa == "avx512") return kAvx512Kernel;
  return kAvx2Kernel;
}

// Every 64-bit word of [data, data + bytes) OR-ed together, split over the threads: the floor.
uint64_t stream_read(const uint8_t* data, int64_t bytes) {
  const uint64_t* words = reinterpret_cast<const uint64_t*>(data);
  const int64_t lines = bytes / 64;
  uint64_t all = 0;
#pragma omp parallel for reduction(| : all) schedule(static)
  for (int64_t line = 0; line < lines; ++line) {
    uint64_t acc = 0;
    for (int w = 0; w < 8; ++w) acc |= words[line * 8 + w];
    all |= acc;
  }
  return all;
}

std::vector<uint8_t> flush_buffer(64 << 20);
void flush_caches() {
  for (size_t i = 0; i < flush_buffer.size(); i += 64) flush_buffer[i] += 1;
}

// Cache storage on 2 MiB boundaries; with HUGE=1 in huge pages (as a THP-backed allocator would give).
uint8_t* allocate(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  auto* data = static_cast<uint8_t*>(std::aligned_alloc(kHuge, rounded));
  if (getenv("HUGE")) madvise(data, rounded, MADV_HUGEPAGE);
  std::memset(data, 0, rounded);
  return data;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--dtype")
      o.dtype = value;
    else if (key == "--batch")
      o.batch = std::atoll(value.c_str());
    else if (key == "--len")
      o.len = std::atoll(value.c_str());
    else if (key == "--new")
      o.new_tokens = std::atoll(value.c_str());
    else if (key == "--threads")
      o.threads = std::atoll(value.c_str());
    else if (key == "--reps")
      o.reps = std::atoll(value.c_str());
    else if (key == "--isa")
      o.isa = value;
    else if (key == "--warm")
      o.warm = value == "1";
    else {
      std::fprintf(stderr, "unknown option %s\n", key.c_str());
      return 2;
    }
  }
  omp_set_num_threads(static_cast<int>(o.threads));
  const CacheDtype dtype = o.dtype == "fp32"   ? CacheDtype::kFloat
                           : o.dtype == "e4m3" ? CacheDtype::kFloat8E4M3
                           : o.dtype == "e5m2" ? CacheDtype::kFloat8E5M2
                                               : CacheDtype::kBFloat16;
  const int64_t elem = dtype == CacheDtype::kFloat ? 4 : dtype == CacheDtype::kBFloat16 ? 2 : 1;
  const AttentionKernel& kernel = kernel_named(o.isa);
  if (!kernel.can_read(dtype)) {
    std::fprintf(stderr, "the %s kernel does not read %s caches\n", kernel.isa, o.dtype.c_str());
    return 2;
  }
  const bool paired = kernel.pairs(dtype);
  const int64_t group = o.num_heads / o.num_kv_heads, D = o.head_dim, Hkv = o.num_kv_heads;
  const int64_t blocks_per_row = (o.len + o.block_size - 1) / o.block_size;
  const int64_t num_blocks = o.batch * blocks_per_row;
  const int64_t block_elems = o.block_size * Hkv * D;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  // Cache values, as decoded floats (the reference's) and as stored bytes (the kernel's).
  std::vector<float> k_values(num_blocks * block_elems), v_values(num_blocks * block_elems);
  const size_t cache_bytes = num_blocks * block_elems * elem;
  uint8_t* k_bytes = allocate(cache_bytes);
  uint8_t* v_bytes = allocate(cache_bytes);
  auto store = [&](std::vector<float>& values, uint8_t* bytes) {
    for (int64_t i = 0; i < static_cast<int64_t>(values.size()); ++i) {
      const float x = std::clamp(normal(rng), -2.f, 2.f);
      if (dtype == CacheDtype::kFloat) {
        std::memcpy(&bytes[i * 4], &x, 4);
        values[i] = x;
      } else if (dtype == CacheDtype::kBFloat16) {
        const uint16_t b = float_to_bf16(x);
        std::memcpy(&bytes[i * 2], &b, 2);
        values[i] = bf16_to_float(b);
      } else {
        const uint8_t b = static_cast<uint8_t>(rng() & 0xff);
        const float decoded = dtype == CacheDtype::kFloat8E4M3 ? e4m3_decode(b) : e5m2_decode(b);
        // Finite values of moderate size only (the reference is not what is under test here).
        if (!std::isfinite(decoded) || std::fabs(decoded) > 4.f ||
            (dtype == CacheDtype::kFloat8E4M3 && (b & 0x7f) == 0x7f)) {
          --i;
          continue;
        }
        bytes[i] = b;
        values[i] = decoded;
      }
    }
  };
  store(k_values, k_bytes);
  store(v_values, v_bytes);

  std::vector<int32_t> table(num_blocks);
  std::iota(table.begin(), table.end(), 0);
  if (!getenv("NO_SHUFFLE")) std::shuffle(table.begin(), table.end(), rng);
  std::vector<int32_t> seq_lens(o.batch, static_cast<int32_t>(o.len));
  std::vector<int64_t> query_start(o.batch + 1);
  for (int64_t b = 0; b <= o.batch; ++b) query_start[b] = b * o.new_tokens;
  const int64_t tokens = o.batch * o.new_tokens;

  // q as the kernel takes it: [row][kv head][new token][group][head_dim], scale folded in, paired order if asked.
  std::vector<float> q_natural(tokens * o.num_heads * D), q(tokens * o.num_heads * D);
  for (auto& x : q_natural) x = normal(rng) / std::sqrt(static_cast<float>(D));
  for (int64_t i = 0; i < static_cast<int64_t>(q.size()); ++i) {
    const int64_t d = i % D;
    q[i - d + (paired ? paired_index(d) : d)] = q_natural[i];
  }

  AttentionProblem p{};
  p.q = q.data();
  p.k_cache = k_bytes;
  p.v_cache = v_bytes;
  p.block_stride = block_elems;
  p.cache_dtype = dtype;
  p.block_table = table.data();
  p.block_table_stride = blocks_per_row;
  p.seq_lens = seq_lens.data();
  p.query_start = query_start.data();
  p.batch = o.batch;
  p.num_heads = o.num_heads;
  p.num_kv_heads = Hkv;
  p.head_dim = D;
  p.block_size = o.block_size;
  p.max_queries = o.new_tokens;
  // As choose_chunk_len: 4 items per thread, chunks of at least 256 tokens, a multiple of the tile.
  const int64_t wanted = (4 * o.threads + o.batch - 1) / o.batch;
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, (o.len + 255) / 256));
  p.chunk_len = ((o.len + chunks - 1) / chunks + kTokenTile - 1) / kTokenTile * kTokenTile;
  p.num_chunks = (o.len + p.chunk_len - 1) / p.chunk_len;
  std::vector<float> partial_out(p.num_partials() * D), partial_max(p.num_partials()), partial_sum(p.num_partials());
  p.partial_out = partial_out.data();
  p.partial_max = partial_max.data();
  p.partial_sum = partial_sum.data();

  auto run = [&] {
#pragma omp parallel
    {
      std::vector<float> scratch(p.scratch_floats());
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < p.num_items(); ++item) kernel.attend(p, item, item + 1, scratch.data());
    }
  };

  // Check: merge the chunks of every (token, head) and compare with fp64 softmax attention.
  run();
  double worst = 0.;
  for (int64_t b = 0; b < o.batch; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t i = 0; i < o.new_tokens; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          const int64_t query = i * group + g;
          const float* qv = &q_natural[((query_start[b] * o.num_heads) + h * o.new_tokens * group + query) * D];
          const int64_t visible = o.len - o.new_tokens + 1 + i;
          std::vector<double> scores(visible), ref(D, 0.);
          double top = -1e300, total = 0.;
          for (int64_t t = 0; t < visible; ++t) {
            const int64_t base =
                table[b * blocks_per_row + t / o.block_size] * block_elems + (t % o.block_size) * Hkv * D + h * D;
            double s = 0.;
            for (int64_t d = 0; d < D; ++d) s += static_cast<double>(qv[d]) * k_values[base + d];
            scores[t] = s;
            top = std::max(top, s);
          }
          for (int64_t t = 0; t < visible; ++t) {
            const int64_t base =
                table[b * blocks_per_row + t / o.block_size] * block_elems + (t % o.block_size) * Hkv * D + h * D;
            const double w = std::exp(scores[t] - top);
            total += w;
            for (int64_t d = 0; d < D; ++d) ref[d] += w * v_values[base + d];
          }
          double global = -1e300;
          for (int64_t c = 0; c < p.num_chunks; ++c)
            global = std::max<double>(global, partial_max[p.partial_index(b, h, c) + query]);
          std::vector<double> merged(D, 0.);
          double denominator = 0.;
          for (int64_t c = 0; c < p.num_chunks; ++c) {
            const int64_t index = p.partial_index(b, h, c) + query;
            if (partial_sum[index] == 0.f) continue;
            const double weight = std::exp(partial_max[index] - global);
            denominator += weight * partial_sum[index];
            const double unscale = weight / sum_scale(partial_sum[index]);  // partial_out is sum p v * sum_scale(l)
            for (int64_t d = 0; d < D; ++d)
              merged[d] += unscale * partial_out[index * D + (paired ? paired_index(d) : d)];
          }
          for (int64_t d = 0; d < D; ++d) worst = std::max(worst, std::fabs(merged[d] / denominator - ref[d] / total));
        }
      }
    }
  }

  const int64_t kv_bytes = 2 * o.batch * o.len * Hkv * D * elem;
  std::vector<uint8_t> contiguous(kv_bytes, 1);
  std::vector<double> kernel_s, floor_s;
  volatile uint64_t sink = 0;
  for (int64_t rep = 0; rep < o.reps; ++rep) {
    if (!o.warm) flush_caches();
    auto start = std::chrono::steady_clock::now();
    run();
    kernel_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    if (!o.warm) flush_caches();
    start = std::chrono::steady_clock::now();
    sink = sink + stream_read(contiguous.data(), kv_bytes);
    floor_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  const double kernel_time = median(kernel_s), floor = median(floor_s);
  const double per_token_head = kernel_time * 1e9 * o.threads / (o.batch * o.len * Hkv);
  std::printf(
      "%s %s B=%lld L=%lld new=%lld threads=%lld: kernel %.3f ms (%.0f ns/token-kvhead/thread), floor %.3f ms "
      "(%.1f GB/s), kernel/floor %.2f, max |err| %.2e\n",
      kernel.isa, o.dtype.c_str(), (long long)o.batch, (long long)o.len, (long long)o.new_tokens, (long long)o.threads,
      kernel_time * 1e3, per_token_head, floor * 1e3, kv_bytes / floor / 1e9, kernel_time / floor, worst);
  return worst < 1e-3 ? 0 : 1;
}
