// The prepared-weight cache (weight_cache.h says what it keeps and when it is used).
#include "weight_cache.h"

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>
#include <vector>

namespace cnnkernels::cpu {
namespace {

class PreparedWeightCache {
 public:
  at::Tensor get(WeightForm form, const at::Tensor& w, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                 const std::function<at::Tensor()>& make) {
    if (!w.is_non_overlapping_and_dense() || capacity_bytes() == 0) return make();
    const Key key{form, w.unsafeGetTensorImpl(), w.scalar_type(), w.sizes().vec(), w.strides().vec(),
                  input_sizes.vec(), stride.vec(), padding.vec(), dilation.vec(), groups};
    const auto bytes = static_cast<size_t>(w.numel()) * w.element_size();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->key != key) continue;
        if (std::memcmp(it->weight_copy.const_data_ptr(), w.const_data_ptr(), bytes) == 0) {
          entries_.splice(entries_.begin(), entries_, it);  // most recently used first
          return it->prepared;
        }
        held_bytes_ -= 2 * bytes;
        entries_.erase(it);
        break;
      }
    }
    at::Tensor prepared = make();
    Entry entry{key, w.clone(at::MemoryFormat::Preserve), prepared};
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_front(std::move(entry));
    held_bytes_ += 2 * bytes;
    while (held_bytes_ > capacity_bytes() && !entries_.empty()) {
      const auto& last = entries_.back().weight_copy;
      held_bytes_ -= 2 * static_cast<size_t>(last.numel()) * last.element_size();
      entries_.pop_back();
    }
    return prepared;
  }

 private:
  using Key = std::tuple<WeightForm, const void*, at::ScalarType, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, int64_t>;
  struct Entry {
    Key key;
    at::Tensor weight_copy;  // the bytes the prepared weight was made from
    at::Tensor prepared;
  };

  static size_t capacity_bytes() {
    static const size_t capacity = [] {
      const char* value = std::getenv("CNNKERNELS_CPU_WEIGHT_CACHE_MB");
      return static_cast<size_t>(value ? std::atoll(value) : 1024) << 20;
    }();
    return capacity;
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  size_t held_bytes_ = 0;
};

}  // namespace

at::Tensor prepared_weight(WeightForm form, const at::Tensor& w, at::IntArrayRef input_sizes,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups, const std::function<at::Tensor()>& make) {
  // Never destroyed: tensors must not be freed by static destructors at exit, after the
  // libraries that own their memory may already be gone.
  static auto* cache = new PreparedWeightCache();
  return cache->get(form, w, input_sizes, stride, padding, dilation, groups, make);
}

}  // namespace cnnkernels::cpu
