// The user's own keys (64-bit integers or UTF-8 strings) to dense ids 0..n-1 and back.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace rec_engine {

// Two positions of the key storage that hold the same key (keys must be distinct).
class DuplicateKey : public std::invalid_argument {
 public:
  DuplicateKey(int64_t first, int64_t second)
      : std::invalid_argument("duplicate key at positions " + std::to_string(first) + " and " +
                              std::to_string(second)),
        first(first), second(second) {}
  int64_t first, second;
};

// A read-only hash index over key storage owned by the caller, which must outlive it: an int64 array of
// n keys, or a byte blob with n + 1 int64 offsets (key i is blob[offsets[i], offsets[i + 1])). The index
// itself holds one int32 slot per bucket (open addressing, linear probing, load factor at most 5/8): about
// 6.4 bytes per key, built in one pass. find() is safe from many threads at once.
class KeyIndex {
 public:
  static KeyIndex from_ints(const int64_t* keys, int64_t n);
  static KeyIndex from_strings(const char* blob, const int64_t* offsets, int64_t n);

  // The dense id of key, or -1 when it is not in the index (or the index holds the other key type).
  int64_t find(int64_t key) const;
  int64_t find(std::string_view key) const;

  // Batched finds: out[i] = find(keys[i]). The hashes are computed and the buckets prefetched a few keys
  // ahead, so the memory latency of a large index overlaps (several times faster than one find per key).
  void find_many(const int64_t* keys, int64_t n, int64_t* out) const;
  void find_many(const std::string_view* keys, int64_t n, int64_t* out) const;

  int64_t size() const { return n_; }
  bool holds_strings() const { return blob_ != nullptr; }
  std::string_view string_at(int64_t id) const {
    return {blob_ + offsets_[id], static_cast<size_t>(offsets_[id + 1] - offsets_[id])};
  }

 private:
  KeyIndex() = default;
  void build();
  uint64_t hash_of(int64_t id) const;
  template <class Key>
  int64_t probe(uint64_t h, const Key& key) const;

  const int64_t* ints_ = nullptr;
  const char* blob_ = nullptr;
  const int64_t* offsets_ = nullptr;
  int64_t n_ = 0;
  uint64_t mask_ = 0;
  std::vector<int32_t> slots_;  // dense id, or -1 for an empty bucket
};

}  // namespace rec_engine
