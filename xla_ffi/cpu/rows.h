// Row buffers of the CPU kernels: RowBand (point-major rows in the accumulation type) and Band
// (channel-major, column-upsampled, zero-padded window rows), and the zeros helper.
#ifndef SAPA_JAX_XLA_FFI_CPU_ROWS_H_
#define SAPA_JAX_XLA_FFI_CPU_ROWS_H_

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "cpu/types.h"
#include "sapa_common.h"

namespace sapa::cpu {

// A window of pixel rows of one NHWC image, point-major, in the accumulation type: direct
// pointers when the storage type already is the accumulation type, else rows converted into a
// ring of `slots` rows (a row stays converted while consecutive windows keep using it).
template <typename T, typename A>
class RowBand {
 public:
  RowBand(int64_t width, int64_t channels, int64_t slots)
      : width_(width), channels_(channels), slots_(slots),
        buffer_(std::is_same_v<T, A> ? 0 : size_t(slots * width * channels)),
        tags_(std::is_same_v<T, A> ? 0 : size_t(slots), nullptr) {}

  // `image` points at row 0 of one batch element; rows [row0, row1) (at most `slots` of
  // them) become addressable.
  void load(const T* image, int64_t row0, int64_t row1) {
    image_ = image;
    if constexpr (!std::is_same_v<T, A>) {
      const int64_t row_size = width_ * channels_;
      for (int64_t row = row0; row < row1; ++row) {
        const T* src = image + row * row_size;
        const size_t slot = size_t(row % slots_);
        if (tags_[slot] == src) continue;
        tags_[slot] = src;
        A* dst = buffer_.data() + slot * row_size;
        for (int64_t e = 0; e < row_size; ++e) dst[e] = to_acc(src[e]);
      }
    }
  }

  const A* at(int64_t row, int64_t col) const {
    if constexpr (std::is_same_v<T, A>) {
      return image_ + (row * width_ + col) * channels_;
    } else {
      return buffer_.data() + ((row % slots_) * width_ + col) * channels_;
    }
  }

 private:
  int64_t width_, channels_, slots_;
  const T* image_ = nullptr;
  std::vector<A> buffer_;
  std::vector<const T*> tags_;  // which image row each slot holds
};

template <typename A> std::vector<A> zeros(int64_t n) { return std::vector<A>(size_t(n), A(0)); }

// Rows of a low-res tensor (n, H, W, ch) transposed to channel-major and upsampled by s along
// the columns into zero-padded rows of stride band_w: row(b, i)[c * band_w + r s + jj] =
// x[b, i, jj / s, c]. Tap (dy, dx) of output column j then sits at column j + (dx + r) s of
// window row dy, and out-of-map columns read the zero padding (the logit 0 of an outside tap).
// A ring of K rows: consecutive work items of a thread share K - 1 of their window rows.
template <typename T, typename A>
class Band {
 public:
  Band(const Geometry& g, int64_t ch, int64_t band_w)
      : g_(g), ch_(ch), band_w_(band_w), data_(zeros<A>(g.K * ch * band_w)),
        low_(zeros<A>(ch * g.W)), tags_(size_t(g.K), -1) {}

  SAPA_INLINE const A* row(const T* x, int64_t b, int64_t i) {
    const int64_t slot = i % g_.K, key = b * g_.H + i;
    A* dst = data_.data() + slot * ch_ * band_w_ + g_.r * g_.s;
    if (tags_[slot] != key) {  // the padding columns are never written: they stay zero
      tags_[slot] = key;
      const T* src = x + key * g_.W * ch_;
      if (g_.s == 1) {
        transpose(src, ch_, g_.W, ch_, dst, band_w_);
      } else {
        transpose(src, ch_, g_.W, ch_, low_.data(), g_.W);
        for (int64_t c = 0; c < ch_; ++c)
          repeat_each(low_.data() + c * g_.W, g_.W, g_.s, dst + c * band_w_);
      }
    }
    return dst - g_.r * g_.s;
  }

 private:
  Geometry g_;
  int64_t ch_, band_w_;
  std::vector<A> data_, low_;  // the ring; one transposed row before upsampling
  std::vector<int64_t> tags_;
};

}  // namespace sapa::cpu

#endif  // SAPA_JAX_XLA_FFI_CPU_ROWS_H_
