// rpb_server_cxx.cc - anchor "gRPC C++": what a C/C++ user would write
// instead of the module, on Debian's libgrpc++-dev (1.51), with the same
// stdio semantics:
//   - a bounded queue (bytes), overflow policy "block": Put waits for space;
//   - one write in flight per stream (ServerWriteReactor), exactly once, in
//     order; an idle stream is started by the producer that fills it, so no
//     gRPC thread is woken just to look at the queue;
//   - messages are protobuf C++ plugin.StdioData, serialized by the library.
// The service is registered exactly as protoc's grpc_cpp_plugin generates a
// CallbackService (AddMethod + MarkMethodCallback); the plugin is not
// packaged by Debian, so the few generated lines are written here.
//
//   rpb_server_cxx ADDR QUEUE_BYTES
//
// Same command protocol as rpb_server (LISTEN / GO / STATS / STOP).
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/service_type.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>
#include <google/protobuf/empty.pb.h>

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "bench_util.h"
#include "grpc_stdio.pb.h"

namespace {

class StdioService;

class StdioReactor : public grpc::ServerWriteReactor<plugin::StdioData> {
 public:
  explicit StdioReactor(StdioService* svc);
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  plugin::StdioData current;  // the message in flight
  bool idle = false;
  bool finished = false;
  StdioReactor* next_idle = nullptr;

 private:
  StdioService* svc_;
};

class StdioService : public grpc::Service {
 public:
  explicit StdioService(size_t cap) : cap_(cap) {
    AddMethod(new grpc::internal::RpcServiceMethod(
        "/plugin.GRPCStdio/StreamStdio",
        grpc::internal::RpcMethod::SERVER_STREAMING, nullptr));
    MarkMethodCallback(0, new grpc::internal::CallbackServerStreamingHandler<
                              google::protobuf::Empty, plugin::StdioData>(
                              [this](grpc::CallbackServerContext*,
                                     const google::protobuf::Empty*) {
                                return new StdioReactor(this);
                              }));
  }

  // A host thread queues one chunk; blocks while the queue is full.
  bool Put(int channel, const char* data, size_t len) {
    std::unique_lock<std::mutex> lock(mu_);
    space_.wait(lock, [&] { return closed_ || used_ + len <= cap_; });
    if (closed_) return false;
    plugin::StdioData m;
    m.set_channel(static_cast<plugin::StdioData_Channel>(channel));
    m.set_data(data, len);
    queue_.push_back(std::move(m));
    used_ += len;
    StdioReactor* r = idle_;
    if (r == nullptr) return true;
    idle_ = r->next_idle;
    r->idle = false;
    TakeLocked(r);
    // Started under the lock: the reactor cannot finish meanwhile, and
    // reactions never run inline in StartWrite.
    r->StartWrite(&r->current);
    return true;
  }

  // The reactor's write finished (or it just opened): next message or idle.
  void Next(StdioReactor* r) {
    std::lock_guard<std::mutex> lock(mu_);
    if (r->finished) return;
    if (queue_.empty()) {
      if (closed_) {
        r->finished = true;
        r->Finish(grpc::Status::OK);
        return;
      }
      r->idle = true;
      r->next_idle = idle_;
      idle_ = r;
      return;
    }
    TakeLocked(r);
    r->StartWrite(&r->current);
  }

  void Cancelled(StdioReactor* r, bool writing) {
    std::lock_guard<std::mutex> lock(mu_);
    if (r->idle) RemoveIdleLocked(r);
    if (!writing && !r->finished) {
      r->finished = true;
      r->Finish(grpc::Status::CANCELLED);
    }
  }

  void WriteFailed(StdioReactor* r) {
    std::lock_guard<std::mutex> lock(mu_);
    // Not delivered: back to the head of the queue, exactly once.
    used_ += r->current.data().size();
    queue_.push_front(std::move(r->current));
    if (!r->finished) {
      r->finished = true;
      r->Finish(grpc::Status::CANCELLED);
    }
  }

  void Close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    space_.notify_all();
    while (idle_) {
      StdioReactor* r = idle_;
      idle_ = r->next_idle;
      r->idle = false;
      r->finished = true;
      r->Finish(grpc::Status::OK);
    }
  }

  uint64_t sent() {
    std::lock_guard<std::mutex> lock(mu_);
    return sent_;
  }

 private:
  void TakeLocked(StdioReactor* r) {
    r->current = std::move(queue_.front());
    queue_.pop_front();
    used_ -= r->current.data().size();
    sent_++;
    space_.notify_one();
  }
  void RemoveIdleLocked(StdioReactor* r) {
    for (StdioReactor** pp = &idle_; *pp; pp = &(*pp)->next_idle)
      if (*pp == r) {
        *pp = r->next_idle;
        break;
      }
    r->idle = false;
  }

  std::mutex mu_;
  std::condition_variable space_;
  std::deque<plugin::StdioData> queue_;
  size_t used_ = 0;
  size_t cap_;
  bool closed_ = false;
  StdioReactor* idle_ = nullptr;
  uint64_t sent_ = 0;
};

StdioReactor::StdioReactor(StdioService* svc) : svc_(svc) {
  StartSendInitialMetadata();
  svc_->Next(this);
}

void StdioReactor::OnWriteDone(bool ok) {
  if (ok)
    svc_->Next(this);
  else
    svc_->WriteFailed(this);
}

void StdioReactor::OnCancel() {
  svc_->Cancelled(this, !idle && !finished);
}

void StdioReactor::OnDone() {
  delete this;
}

void Stats(const char* word) {
  double u, s;
  long maxrss, vcs, ics;
  rpb_cpu(&u, &s, &maxrss);
  rpb_ctxsw(&vcs, &ics);
  rpb_say(
      "%s {\"rss_kb\": %ld, \"hwm_kb\": %ld, \"maxrss_kb\": %ld, "
      "\"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"fds\": %d, "
      "\"ctxsw_vol\": %ld, \"ctxsw_invol\": %ld, \"t\": %llu}",
      word, rpb_rss_kb(0), rpb_hwm_kb(0), maxrss, u, s, rpb_count_fds(0), vcs,
      ics, static_cast<unsigned long long>(rpb_now_ns()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: rpb_server_cxx ADDR QUEUE_BYTES\n");
    return 2;
  }
  std::string addr = argv[1];
  StdioService svc(static_cast<size_t>(std::strtoull(argv[2], nullptr, 10)));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials());
  builder.RegisterService(&svc);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) {
    rpb_say("ERR cannot listen on %s", addr.c_str());
    return 1;
  }
  rpb_say("LISTEN %s %d", addr.c_str(), static_cast<int>(getpid()));

  std::thread producer;
  char line[256];
  while (std::fgets(line, sizeof line, stdin)) {
    long n = 0;
    unsigned long size = 0;
    if (std::sscanf(line, "GO %ld %lu", &n, &size) == 2 && n > 0 && size > 0) {
      if (producer.joinable()) producer.join();
      producer = std::thread([&svc, n, size] {
        std::string buf(size, 'a');
        for (size_t k = 0; k < size; k++)
          buf[k] = static_cast<char>('a' + k % 26);
        buf[size - 1] = '\n';
        uint64_t t0 = rpb_now_ns();
        long ok = 0;
        for (long i = 0; i < n; i++)
          if (svc.Put(1, buf.data(), buf.size())) ok++;
        uint64_t t1 = rpb_now_ns();
        rpb_say("PRODUCED %llu %llu %ld 0 %ld -",
                static_cast<unsigned long long>(t0),
                static_cast<unsigned long long>(t1), ok, n - ok);
      });
    } else if (std::strncmp(line, "STATS", 5) == 0) {
      Stats("STATS");
    } else if (std::strncmp(line, "STOP", 4) == 0) {
      break;
    } else {
      rpb_say("ERR unknown command");
    }
  }
  uint64_t t0 = rpb_now_ns();
  svc.Close();
  if (producer.joinable()) producer.join();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server->Wait();
  uint64_t t1 = rpb_now_ns();
  rpb_say("BYE {\"shutdown_ms\": %.3f}", (t1 - t0) / 1e6);
  return 0;
}
