#include "rec_engine/keys.hpp"

#include <cstring>
#include <type_traits>

namespace rec_engine {
namespace {

inline uint64_t mix64(uint64_t x) {  // splitmix64's finalizer: every input bit reaches every output bit
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline uint64_t hash_bytes(const char* p, size_t n) {  // FNV-1a over 8-byte words, then mixed
  uint64_t h = 0xcbf29ce484222325ULL ^ n;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0x100000001b3ULL;
    p += 8;
    n -= 8;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, p, n);
  h = (h ^ tail) * 0x100000001b3ULL;
  return mix64(h);
}

}  // namespace

KeyIndex KeyIndex::from_ints(const int64_t* keys, int64_t n) {
  KeyIndex k;
  k.ints_ = keys;
  k.n_ = n;
  k.build();
  return k;
}

KeyIndex KeyIndex::from_strings(const char* blob, const int64_t* offsets, int64_t n) {
  if (n < 0) throw std::invalid_argument("the number of keys must be >= 0");
  if (offsets[0] != 0) throw std::invalid_argument("key offsets must start at 0");
  for (int64_t i = 0; i < n; ++i)
    if (offsets[i + 1] < offsets[i])
      throw std::invalid_argument("key offsets must not decrease (at position " + std::to_string(i + 1) + ")");
  KeyIndex k;
  k.blob_ = blob;
  k.offsets_ = offsets;
  k.n_ = n;
  k.build();
  return k;
}

uint64_t KeyIndex::hash_of(int64_t id) const {
  if (blob_ == nullptr) return mix64(static_cast<uint64_t>(ints_[id]));
  return hash_bytes(blob_ + offsets_[id], static_cast<size_t>(offsets_[id + 1] - offsets_[id]));
}

void KeyIndex::build() {
  if (n_ < 0) throw std::invalid_argument("the number of keys must be >= 0");
  if (n_ >= (int64_t{1} << 31) - 1) throw std::invalid_argument("a key index holds fewer than 2^31 - 1 keys");
  uint64_t cap = 8;
  while (cap * 5 < static_cast<uint64_t>(n_) * 8) cap <<= 1;  // n / cap <= 5/8
  mask_ = cap - 1;
  slots_.assign(cap, -1);
  for (int64_t id = 0; id < n_; ++id) {
    for (uint64_t s = hash_of(id) & mask_;; s = (s + 1) & mask_) {
      const int32_t other = slots_[s];
      if (other < 0) {
        slots_[s] = static_cast<int32_t>(id);
        break;
      }
      const bool same = blob_ == nullptr ? ints_[other] == ints_[id] : string_at(other) == string_at(id);
      if (same) throw DuplicateKey(other, id);
    }
  }
}

template <class Key>
int64_t KeyIndex::probe(uint64_t h, const Key& key) const {
  for (uint64_t s = h & mask_;; s = (s + 1) & mask_) {
    const int32_t id = slots_[s];
    if constexpr (std::is_same_v<Key, int64_t>) {
      if (id < 0 || ints_[id] == key) return id;
    } else {
      if (id < 0 || string_at(id) == key) return id;
    }
  }
}

int64_t KeyIndex::find(int64_t key) const {
  if (blob_ != nullptr) return -1;
  return probe(mix64(static_cast<uint64_t>(key)), key);
}

int64_t KeyIndex::find(std::string_view key) const {
  if (blob_ == nullptr) return -1;
  return probe(hash_bytes(key.data(), key.size()), key);
}

namespace {
constexpr int64_t kAhead = 8;  // keys whose buckets are in flight
}

void KeyIndex::find_many(const int64_t* keys, int64_t n, int64_t* out) const {
  if (blob_ != nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = -1;
    return;
  }
  std::vector<uint64_t> h(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) h[i] = mix64(static_cast<uint64_t>(keys[i]));
  for (int64_t i = 0; i < n && i < kAhead; ++i) __builtin_prefetch(&slots_[h[i] & mask_]);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(&slots_[h[i + kAhead] & mask_]);
    out[i] = probe(h[i], keys[i]);
  }
}

void KeyIndex::find_many(const std::string_view* keys, int64_t n, int64_t* out) const {
  if (blob_ == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = -1;
    return;
  }
  std::vector<uint64_t> h(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) h[i] = hash_bytes(keys[i].data(), keys[i].size());
  // two stages in flight: the bucket of key i + 2A, then the stored key (offsets) of key i + A
  for (int64_t i = 0; i < n; ++i) {
    if (i + 2 * kAhead < n) __builtin_prefetch(&slots_[h[i + 2 * kAhead] & mask_]);
    if (i + kAhead < n) {
      const int32_t id = slots_[h[i + kAhead] & mask_];
      if (id >= 0) {
        __builtin_prefetch(&offsets_[id]);
        __builtin_prefetch(blob_ + offsets_[id]);
      }
    }
    out[i] = probe(h[i], keys[i]);
  }
}

}  // namespace rec_engine
