// The C ABI over Gloo (Debian's libgloo-dev) that src/distributed/gloo.rs calls: a full mesh of TCP
// pairs between the ranks, met through the rank-0 key-value store of src/distributed/store.rs (a Gloo
// Store whose set/get/wait call back into Rust), and the three collectives training needs.
// Every entry point catches C++ exceptions and returns their message: nothing unwinds into Rust.

#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// Return 0 on success; on failure the Rust side keeps its own message.
typedef int (*marlin_store_set_fn)(void* ctx, const char* key, const char* data, size_t len);
// Fills `out` (a std::vector<char>*) through marlin_gloo_assign.
typedef int (*marlin_store_get_fn)(void* ctx, const char* key, void* out, int64_t timeout_ms);
typedef int (*marlin_store_wait_fn)(void* ctx, const char* key, int64_t timeout_ms);

void marlin_gloo_assign(void* out, const char* data, size_t len) {
  static_cast<std::vector<char>*>(out)->assign(data, data + len);
}
}

namespace {

class RustStore : public gloo::rendezvous::Store {
 public:
  RustStore(void* ctx, marlin_store_set_fn set, marlin_store_get_fn get,
            marlin_store_wait_fn wait, int64_t timeout_ms)
      : ctx_(ctx), set_(set), get_(get), wait_(wait), timeout_ms_(timeout_ms) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    if (set_(ctx_, key.c_str(), data.data(), data.size()) != 0) {
      throw std::runtime_error("store set failed: " + key);
    }
  }

  std::vector<char> get(const std::string& key) override {
    std::vector<char> out;
    if (get_(ctx_, key.c_str(), &out, timeout_ms_) != 0) {
      throw std::runtime_error("store get failed: " + key);
    }
    return out;
  }

  void wait(const std::vector<std::string>& keys) override {
    wait(keys, std::chrono::milliseconds(timeout_ms_));
  }

  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    for (const auto& k : keys) {
      if (wait_(ctx_, k.c_str(), timeout.count()) != 0) {
        throw std::runtime_error("store wait failed: " + k);
      }
    }
  }

 private:
  void* ctx_;
  marlin_store_set_fn set_;
  marlin_store_get_fn get_;
  marlin_store_wait_fn wait_;
  int64_t timeout_ms_;
};

struct Group {
  std::shared_ptr<gloo::rendezvous::Context> context;
  uint32_t tag = 0;
};

void write_error(const char* what, char* err, size_t len) {
  if (len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

// Element-wise sum, written so the compiler vectorises it (gloo::sum<float> counts with an int).
void sum_f32(void* c_, const void* a_, const void* b_, size_t n) {
  float* c = static_cast<float*>(c_);
  const float* a = static_cast<const float*>(a_);
  const float* b = static_cast<const float*>(b_);
  for (size_t i = 0; i < n; i++) c[i] = a[i] + b[i];
}

}  // namespace

extern "C" {

// A connected group, or null with the reason in `err`. `hostname` (or `iface`, when not empty)
// is where this rank's pairs listen; the other ranks connect to it.
void* marlin_gloo_new(int rank, int size, const char* hostname, const char* iface,
                      int64_t timeout_ms, void* store_ctx, marlin_store_set_fn set,
                      marlin_store_get_fn get, marlin_store_wait_fn wait, char* err,
                      size_t err_len) {
  try {
    gloo::transport::tcp::attr attr;
    if (iface != nullptr && iface[0] != '\0') {
      attr.iface = iface;
    } else {
      attr.hostname = hostname;
    }
    auto device = gloo::transport::tcp::CreateDevice(attr);
    RustStore store(store_ctx, set, get, wait, timeout_ms);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->setTimeout(std::chrono::milliseconds(timeout_ms));
    context->connectFullMesh(store, device);
    auto* g = new Group();
    g->context = std::move(context);
    return g;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
  } catch (...) {
    write_error("unknown Gloo error", err, err_len);
  }
  return nullptr;
}

// In-place sum of `n` floats across the group. 0 on success.
int marlin_gloo_allreduce_sum_f32(void* group, float* data, size_t n, char* err,
                                  size_t err_len) {
  try {
    auto* g = static_cast<Group*>(group);
    gloo::AllreduceOptions opts(g->context);
    opts.setOutput(data, n);
    opts.setReduceFunction(&sum_f32);
    opts.setTag(g->tag++);
    gloo::allreduce(opts);
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
  } catch (...) {
    write_error("unknown Gloo error", err, err_len);
  }
  return 1;
}

// `n` floats of rank `root` copied into every rank's `data`. 0 on success.
int marlin_gloo_broadcast_f32(void* group, float* data, size_t n, int root, char* err,
                              size_t err_len) {
  try {
    auto* g = static_cast<Group*>(group);
    gloo::BroadcastOptions opts(g->context);
    opts.setOutput(data, n);
    opts.setRoot(root);
    opts.setTag(g->tag++);
    gloo::broadcast(opts);
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
  } catch (...) {
    write_error("unknown Gloo error", err, err_len);
  }
  return 1;
}

int marlin_gloo_barrier(void* group, char* err, size_t err_len) {
  try {
    auto* g = static_cast<Group*>(group);
    gloo::BarrierOptions opts(g->context);
    opts.setTag(g->tag++);
    gloo::barrier(opts);
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
  } catch (...) {
    write_error("unknown Gloo error", err, err_len);
  }
  return 1;
}

void marlin_gloo_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}
}
