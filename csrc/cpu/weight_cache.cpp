// The prepared-weight cache (weight_cache.h says what it keeps and when it is used).
#include "weight_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <tuple>
#include <vector>

namespace cnnkernels::cpu {
namespace {

class PreparedWeightCache {
  using Key = std::tuple<WeightForm, const void*, at::ScalarType, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, int64_t>;
  using WeakWeight = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Key key;
    // Keeps the weight's TensorImpl from being freed, so that no other weight can take its
    // address (the key) while this entry lives; expired once the weight is gone.
    WeakWeight weight;
    at::Tensor weight_copy;  // the weight's bytes at the last call
    at::Tensor prepared;     // made from weight_copy, when is_prepared
    bool is_prepared;
  };

  // What an entry counts against the capacity: the memory it holds now.
  static size_t held_by(const Entry& e) {
    return e.weight_copy.nbytes() + (e.prepared.defined() ? e.prepared.numel() * e.prepared.element_size() : 0);
  }

 public:
  PreparedWeight get(WeightForm form, const at::Tensor& w, at::IntArrayRef input_sizes, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     const std::function<at::Tensor()>& make) {
    if (!w.is_non_overlapping_and_dense() || capacity_bytes() == 0) return {make(), false};
    const Key key{form, w.unsafeGetTensorImpl(), w.scalar_type(), w.sizes().vec(), w.strides().vec(),
                  input_sizes.vec(), stride.vec(), padding.vec(), dilation.vec(), groups};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = find(key);
      if (it != entries_.end()) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        Entry& entry = entries_.front();
        if (std::memcmp(entry.weight_copy.const_data_ptr(), w.const_data_ptr(), w.nbytes()) != 0) {
          entry.weight_copy.copy_(w);
          held_bytes_ -= held_by(entry);
          entry.prepared = at::Tensor();  // no longer held: the capacity counts the copy only
          entry.is_prepared = false;
          held_bytes_ += held_by(entry);
          return {at::Tensor(), true};
        }
        if (entry.is_prepared) return {entry.prepared, false};
      }
    }
    // New, or unchanged since a call that found it changing: prepare it now.
    at::Tensor prepared = make();
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = find(key);
    if (it != entries_.end()) {
      held_bytes_ -= held_by(*it);
      entries_.erase(it);
    }
    entries_.push_front(Entry{key, WeakWeight(w.getIntrusivePtr()), w.clone(at::MemoryFormat::Preserve),
                              prepared, true});
    held_bytes_ += held_by(entries_.front());
    while (held_bytes_ > capacity_bytes() && !entries_.empty()) {
      held_bytes_ -= held_by(entries_.back());
      entries_.pop_back();
    }
    return {prepared, false};
  }

 private:
  // The entry for `key`; drops the entries of weights that no longer exist on the way.
  std::list<Entry>::iterator find(const Key& key) {
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->weight.expired()) {
        held_bytes_ -= held_by(*it);
        it = entries_.erase(it);
      } else if (it->key == key) {
        return it;
      } else {
        ++it;
      }
    }
    return entries_.end();
  }

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

PreparedWeight prepared_weight(WeightForm form, const at::Tensor& w, at::IntArrayRef input_sizes,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, const std::function<at::Tensor()>& make) {
  // Never destroyed: tensors must not be freed by static destructors at exit, after the
  // libraries that own their memory may already be gone.
  static auto* cache = new PreparedWeightCache();
  return cache->get(form, w, input_sizes, stride, padding, dilation, groups, make);
}

}  // namespace cnnkernels::cpu
