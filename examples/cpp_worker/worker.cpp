// cpp_worker: a powerhose/1 worker in C++ (README.rst; PROTOCOL.rst is the spec).
//
// Two threads.  The main thread owns the one DEALER socket: it registers,
// heartbeats, watches the broker's liveness, reconnects and handles signals.
// The job thread, started once with the worker, runs the jobs the main
// thread hands it (a mutex and a condition variable), one at a time, so
// heartbeats keep flowing while a job computes; it never touches the socket
// and tells the main thread a job is done through a self-pipe, which the
// signal handler uses too.

#include <cxxabi.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>
#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iomanip>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <typeinfo>
#include <utility>

#include "jobs.hpp"
#include "protocol.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr int EXIT_OK = 0;
constexpr int EXIT_ERROR = 1;
constexpr int EXIT_USAGE = 2;
constexpr int EXIT_NO_BROKER = 2;  // as powerhose-worker: for a supervisor to restart us

constexpr milliseconds FIRST_BACKOFF{100};  // PROTOCOL.rst, "Broker lost"
constexpr milliseconds MAX_BACKOFF{5000};

// -- logging: stderr, one line per event, with our pid -----------------------

template <typename... Parts>
void log(const char* level, const Parts&... parts) {
    auto now = std::chrono::system_clock::now();
    std::time_t seconds = std::chrono::system_clock::to_time_t(now);
    std::tm local{};
    localtime_r(&seconds, &local);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &local);
    auto millis = std::chrono::duration_cast<milliseconds>(now.time_since_epoch()).count() % 1000;
    std::ostringstream line;
    line << stamp << ',' << std::setw(3) << std::setfill('0') << millis << " [" << getpid()
         << "] " << level << " cpp_worker: ";
    (line << ... << parts);
    line << '\n';
    std::fputs(line.str().c_str(), stderr);
}

// Job ids are opaque bytes; logs show them readable.
std::string printable(const std::string& bytes) {
    std::ostringstream out;
    for (unsigned char c : bytes) {
        if (c >= 0x20 && c < 0x7f)
            out << c;
        else
            out << "\\x" << std::hex << std::setw(2) << std::setfill('0') << int(c);
    }
    return out.str();
}

std::string demangle(const char* mangled) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> name(
        abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
    return status == 0 && name ? name.get() : mangled;
}

// -- command line -------------------------------------------------------------

struct Options {
    std::string backend;
    std::string service;
    milliseconds heartbeat{1000};
    std::string job = "echo";
    double broker_timeout = 60.0;  // seconds; 0: wait for a broker forever
    bool verbose = false;
    // CURVE: our key pair and the broker's public key, as Z85 text (40 chars)
    std::string curve_public, curve_secret, curve_server;
};

const char SYNOPSIS[] =
    "usage: cpp_worker --backend ENDPOINT --service NAME [--heartbeat-ms N]\n"
    "                  [--job echo|sha256] [--broker-timeout SECONDS] [--verbose]\n"
    "                  [--curve-secret FILE --curve-broker FILE]\n";

const char HELP[] =
    "\n"
    "A powerhose/1 worker (7/MDP + the extension in PROTOCOL.rst) written in C++.\n"
    "\n"
    "options:\n"
    "  --backend ENDPOINT      the broker's backend, e.g. ipc:///run/ph/back.sock (required)\n"
    "  --service NAME          the service to serve, 1-255 bytes, not mmi.* (required)\n"
    "  --heartbeat-ms N        milliseconds between heartbeats, both ways; use the\n"
    "                          broker's --heartbeat (default 1000)\n"
    "  --job echo|sha256       the job to run when a request has no 'job' header\n"
    "                          (default echo)\n"
    "  --broker-timeout SECS   exit with status 2 after this long without a broker, for\n"
    "                          the supervisor to restart us; 0 waits forever (default 60)\n"
    "  --curve-secret FILE     our CURVE key pair, a .key_secret file (powerhose keys):\n"
    "                          encrypt and authenticate the connection to the broker\n"
    "  --curve-broker FILE     the broker's public key, a .key file (with --curve-secret)\n"
    "  --verbose               log every job, not only failures\n"
    "  --help                  show this help and exit\n"
    "\n"
    "jobs (the request header 'job' chooses one, else --job):\n"
    "  echo     the result is the job data, unchanged (binary-safe)\n"
    "  sha256   SHA-256 applied 'rounds' times (header, 1 to 1000000000, default 1):\n"
    "           round 1 hashes the data, each further round the previous raw 32-byte\n"
    "           digest; the result is the last digest as 64 lowercase hex characters.\n"
    "           A job still running when its ttl_ms passes gives up with TimeoutError.\n"
    "\n"
    "A job that throws is answered with an ExecutionError carrying the exception's\n"
    "what() and class.  SIGTERM or SIGINT: finish the current job, send DISCONNECT,\n"
    "exit 0.\n";

[[noreturn]] void usage_error(const std::string& message) {
    std::cerr << SYNOPSIS << "cpp_worker: error: " << message << '\n';
    std::exit(EXIT_USAGE);
}

// A key from a zmq.auth certificate file: the line `public-key = "..."` or
// `secret-key = "..."`, the Z85 text between the quotes.
std::string read_key(const std::string& option, const std::string& path, const std::string& name) {
    std::ifstream file(path);
    if (!file) usage_error(option + ": cannot read " + path);
    std::string line;
    while (std::getline(file, line)) {
        auto start = line.find_first_not_of(" \t");
        if (start == std::string::npos || line.compare(start, name.size(), name) != 0) continue;
        auto open = line.find('"', start);
        auto close = open == std::string::npos ? open : line.find('"', open + 1);
        if (close != std::string::npos && close - open - 1 == 40)
            return line.substr(open + 1, 40);
    }
    usage_error(option + ": no " + name + " in " + path);
}

double parse_number(const std::string& option, const std::string& value) {
    size_t used = 0;
    double number = -1;
    try {
        number = std::stod(value, &used);
    } catch (const std::exception&) {
    }
    if (used != value.size() || !(number >= 0))
        usage_error(option + " must be a number >= 0, got '" + value + "'");
    return number;
}

Options parse_options(int argc, char** argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--help" || arg == "-h") {
            std::cout << SYNOPSIS << HELP;
            std::exit(EXIT_OK);
        }
        if (arg == "--verbose") {
            options.verbose = true;
            continue;
        }
        std::string value;
        auto equals = arg.find('=');
        if (equals != std::string::npos) {
            value = arg.substr(equals + 1);
            arg.resize(equals);
        }
        if (arg != "--backend" && arg != "--service" && arg != "--job" &&
            arg != "--heartbeat-ms" && arg != "--broker-timeout" && arg != "--curve-secret" &&
            arg != "--curve-broker")
            usage_error("unknown option " + arg);
        if (equals == std::string::npos) {
            if (i + 1 >= argc) usage_error(arg + " needs a value");
            value = argv[++i];
        }
        if (arg == "--backend") {
            options.backend = value;
        } else if (arg == "--service") {
            options.service = value;
        } else if (arg == "--job") {
            options.job = value;
        } else if (arg == "--heartbeat-ms") {
            double ms = parse_number(arg, value);
            if (ms < 1) usage_error("--heartbeat-ms must be at least 1, got '" + value + "'");
            options.heartbeat = milliseconds(static_cast<long>(ms));
        } else if (arg == "--broker-timeout") {
            options.broker_timeout = parse_number(arg, value);
        } else if (arg == "--curve-secret") {
            options.curve_public = read_key(arg, value, "public-key");
            options.curve_secret = read_key(arg, value, "secret-key");
        } else if (arg == "--curve-broker") {
            options.curve_server = read_key(arg, value, "public-key");
        }
    }
    if (options.curve_secret.empty() != options.curve_server.empty())
        usage_error("--curve-secret and --curve-broker go together");
    if (!options.curve_secret.empty() && !zmq_has("curve"))
        usage_error("this libzmq was built without CURVE");
    if (options.backend.empty()) usage_error("--backend is required");
    if (options.service.empty() || options.service.size() > 255)
        usage_error("--service must be 1 to 255 bytes");
    if (options.service.rfind("mmi.", 0) == 0)
        usage_error("service names starting with 'mmi.' are reserved for the broker");
    if (!jobs::exists(options.job))
        usage_error("unknown --job '" + options.job + "'; choose one of " + jobs::NAMES);
    return options;
}

// -- signals and the self-pipe --------------------------------------------------

int wake_pipe[2] = {-1, -1};  // [0]: the main thread polls it; [1]: anyone writes
volatile sig_atomic_t stop_requested = 0;

extern "C" void on_stop_signal(int) {
    int saved = errno;
    stop_requested = 1;
    ssize_t ignored = write(wake_pipe[1], "s", 1);
    (void)ignored;
    errno = saved;
}

void install_signal_handlers() {
    if (pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) != 0)
        throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
    struct sigaction action {};
    action.sa_handler = on_stop_signal;
    sigemptyset(&action.sa_mask);
    sigaction(SIGTERM, &action, nullptr);
    sigaction(SIGINT, &action, nullptr);
}

void drain_wake_pipe() {
    char buffer[64];
    while (read(wake_pipe[0], buffer, sizeof buffer) > 0) {
    }
}

// -- a job, and the thread that runs jobs -------------------------------------------

struct RunningJob {
    std::string client;
    jobs::Job job;
    Clock::time_point started;
    std::atomic<bool> done{false};
    // Written by the job thread before `done`, read by the main thread after it.
    bool ok = false;
    std::string result;  // the result, or the error message
    std::string code, exc_type;

    void run() noexcept {
        try {
            result = jobs::run(job);
            ok = true;
        } catch (const jobs::JobTimeout& error) {
            fail(mdp::ERR_TIMEOUT, error.what(), demangle(typeid(error).name()));
        } catch (const std::exception& error) {
            fail(mdp::ERR_EXECUTION, error.what(), demangle(typeid(error).name()));
        } catch (...) {
            std::type_info* type = abi::__cxa_current_exception_type();
            fail(mdp::ERR_EXECUTION, "the job threw an object that is not a std::exception",
                 type ? demangle(type->name()) : "unknown");
        }
        // The main thread may free us once `done` is set: touch no member after it.
        done.store(true, std::memory_order_release);
        ssize_t ignored = write(wake_pipe[1], "j", 1);
        (void)ignored;
    }

    void fail(const std::string& error_code, const std::string& message,
              const std::string& type) {
        code = error_code;
        result = message;
        exc_type = type;
    }
};

// One thread for the worker's life, running each job the main thread hands it.
class JobThread {
public:
    JobThread() {
        // Signals go to the main thread, whose poll the handler wakes up.
        sigset_t blocked, previous;
        sigemptyset(&blocked);
        sigaddset(&blocked, SIGTERM);
        sigaddset(&blocked, SIGINT);
        pthread_sigmask(SIG_BLOCK, &blocked, &previous);
        thread_ = std::thread([this] { loop(); });
        pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    }

    // Lets a job handed over finish, then joins the thread.
    ~JobThread() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            quit_ = true;
        }
        wake_.notify_one();
        thread_.join();
    }

    // The job must outlive its run, i.e. stay alive until its `done` is set.
    void start(RunningJob* job) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            next_ = job;
        }
        wake_.notify_one();
    }

private:
    void loop() {
        while (true) {
            RunningJob* job;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [this] { return next_ || quit_; });
                if (!next_) return;  // quitting, and no job left to run
                job = std::exchange(next_, nullptr);
            }
            job->run();
        }
    }

    std::mutex mutex_;
    std::condition_variable wake_;
    RunningJob* next_ = nullptr;  // the job handed over, under mutex_
    bool quit_ = false;           // under mutex_
    std::thread thread_;
};

// -- the worker -----------------------------------------------------------------------

class Worker {
public:
    explicit Worker(Options options)
        : options_(std::move(options)), heartbeat_(options_.heartbeat),
          context_(zmq_ctx_new()) {
        if (!context_) throw std::runtime_error("zmq_ctx_new failed");
    }

    // job_thread_, destroyed after this body, joins the job thread.
    ~Worker() {
        close_socket(0);
        zmq_ctx_term(context_);
    }

    int run() {
        log("INFO", "worker pid ", getpid(), " serving '", options_.service, "' (default job ",
            options_.job, ") on ", options_.backend, ", heartbeat ", heartbeat_.count(), "ms");
        connect();
        while (true) {
            wait_and_handle();
            if (running_ && running_->done.load(std::memory_order_acquire)) finish_job();
            if (stop_requested && !running_) return retire();
            auto now = Clock::now();
            if (socket_) {
                if (now >= broker_expiry_)
                    broker_lost(now);
                else if (now >= next_heartbeat_)
                    send(mdp::command(mdp::HEARTBEAT));
            } else if (!running_) {
                // Not connected, and no job to finish before registering again.
                if (broker_timed_out(now)) return EXIT_NO_BROKER;
                if (now >= reconnect_at_) connect();
            }
        }
    }

private:
    // -- connection ---------------------------------------------------------------

    // MDP: after any disconnection, a new socket and a READY.
    void connect() {
        close_socket(0);
        socket_ = zmq_socket(context_, ZMQ_DEALER);
        if (!socket_) throw std::runtime_error(std::string("zmq_socket: ") + zmq_strerror(errno));
        if (!options_.curve_secret.empty()) {  // before connecting: the handshake uses them
            zmq_setsockopt(socket_, ZMQ_CURVE_SERVERKEY, options_.curve_server.c_str(), 40);
            zmq_setsockopt(socket_, ZMQ_CURVE_PUBLICKEY, options_.curve_public.c_str(), 40);
            zmq_setsockopt(socket_, ZMQ_CURVE_SECRETKEY, options_.curve_secret.c_str(), 40);
        }
        if (zmq_connect(socket_, options_.backend.c_str()) != 0)
            throw std::runtime_error("cannot connect to " + options_.backend + ": " +
                                     zmq_strerror(errno));
        send(mdp::ready(options_.service));
        send(mdp::info(about()));
        broker_expiry_ = Clock::now() + heartbeat_ * mdp::LIVENESS;
        log("INFO", "READY sent for '", options_.service, "' to ", options_.backend);
    }

    // pid@host, as the Python worker says it.
    static std::string about() {
        char host[256] = {0};
        if (gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
        return std::to_string(getpid()) + "@" + host;
    }

    void close_socket(int linger_ms) {
        if (!socket_) return;
        zmq_setsockopt(socket_, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
        zmq_close(socket_);
        socket_ = nullptr;
    }

    void broker_lost(Clock::time_point now) {
        if (!no_broker_since_) no_broker_since_ = now - heartbeat_ * mdp::LIVENESS;
        log("WARNING", "no message from the broker at ", options_.backend, " for ",
            mdp::LIVENESS, " heartbeats; reconnecting in ", backoff_.count(), "ms",
            running_ ? " (the running job's result will be dropped)" : "");
        close_socket(0);
        reconnect_at_ = now + backoff_;
        backoff_ = std::min(backoff_ * 2, MAX_BACKOFF);
    }

    bool broker_timed_out(Clock::time_point now) {
        if (options_.broker_timeout <= 0 || !no_broker_since_) return false;
        std::chrono::duration<double> without = now - *no_broker_since_;
        if (without.count() < options_.broker_timeout) return false;
        log("ERROR", "no broker at ", options_.backend, " for ", int(without.count()),
            "s; exiting");
        return true;
    }

    // -- messages ------------------------------------------------------------------

    void send(const mdp::Frames& frames) {
        for (size_t i = 0; i < frames.size(); ++i) {
            int flags = i + 1 < frames.size() ? ZMQ_SNDMORE : 0;
            while (zmq_send(socket_, frames[i].data(), frames[i].size(), flags) < 0) {
                if (errno != EINTR)
                    throw std::runtime_error(std::string("zmq_send: ") + zmq_strerror(errno));
            }
        }
        // Any message counts as a heartbeat (PROTOCOL.rst, "Heartbeats").
        next_heartbeat_ = Clock::now() + heartbeat_;
    }

    std::optional<mdp::Frames> receive() {
        mdp::Frames frames;
        while (true) {
            zmq_msg_t part;
            zmq_msg_init(&part);
            if (zmq_msg_recv(&part, socket_, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&part);
                if (frames.empty() && (errno == EAGAIN || errno == EINTR)) return std::nullopt;
                throw std::runtime_error(std::string("zmq_msg_recv: ") + zmq_strerror(errno));
            }
            frames.emplace_back(static_cast<const char*>(zmq_msg_data(&part)),
                                zmq_msg_size(&part));
            bool more = zmq_msg_more(&part);
            zmq_msg_close(&part);
            if (!more) return frames;
        }
    }

    // Sleep until a message, a signal, a finished job or our next deadline.
    void wait_and_handle() {
        zmq_pollitem_t items[2] = {{nullptr, wake_pipe[0], ZMQ_POLLIN, 0},
                                   {socket_, 0, ZMQ_POLLIN, 0}};
        int count = socket_ ? 2 : 1;
        if (zmq_poll(items, count, poll_timeout_ms()) < 0) {
            if (errno == EINTR) return;
            throw std::runtime_error(std::string("zmq_poll: ") + zmq_strerror(errno));
        }
        if (items[0].revents & ZMQ_POLLIN) drain_wake_pipe();
        if (count == 2 && (items[1].revents & ZMQ_POLLIN)) {
            if (auto frames = receive()) handle(std::move(*frames));
        }
    }

    long poll_timeout_ms() const {
        auto now = Clock::now();
        Clock::time_point next = now + heartbeat_;
        if (socket_)
            next = std::min({next, next_heartbeat_, broker_expiry_});
        else if (!running_)
            next = std::min(next, reconnect_at_);
        auto wait = std::chrono::ceil<milliseconds>(next - now).count();
        return std::max(0L, static_cast<long>(wait));
    }

    void handle(mdp::Frames frames) {
        // Any message from the broker proves it alive.
        broker_expiry_ = Clock::now() + heartbeat_ * mdp::LIVENESS;
        backoff_ = FIRST_BACKOFF;
        no_broker_since_.reset();
        mdp::BrokerCommand command;
        try {
            command = mdp::parse_broker_command(std::move(frames));
        } catch (const mdp::ProtocolError& error) {
            log("WARNING", "dropped malformed message from the broker: ", error.what());
            return;
        }
        if (command.command == mdp::REQUEST) {
            if (running_) {
                log("WARNING", "broker sent job ", printable(command.request.job_id),
                    " while job ", printable(running_->job.id), " runs; dropped");
                return;
            }
            start_job(std::move(command.request));
        } else if (command.command == mdp::DISCONNECT) {
            // The broker does not know us (it restarted, or expired us): the
            // job we run, if any, is already failed, and we register again
            // once we are idle, so that READY is not answered by a REQUEST
            // we could not take.
            log("INFO", "broker sent DISCONNECT; registering again",
                running_ ? " after the running job (its result will be dropped)" : "");
            close_socket(0);
            reconnect_at_ = Clock::now();
        }
    }

    // -- jobs ----------------------------------------------------------------------

    void start_job(mdp::Request request) {
        auto running = std::make_unique<RunningJob>();
        running->client = std::move(request.client);
        jobs::Job& job = running->job;
        job.id = std::move(request.job_id);
        auto chosen = request.headers.find("job");
        job.name = chosen != request.headers.end() ? chosen->second : options_.job;
        job.data = std::move(request.data);
        job.headers = std::move(request.headers);
        running->started = Clock::now();
        if (request.ttl_ms > 0) job.deadline = running->started + milliseconds(request.ttl_ms);
        if (options_.verbose)
            log("INFO", "job ", printable(job.id), " started: ", job.name, ", ", job.data.size(),
                " bytes, ttl ", request.ttl_ms, "ms");
        running_ = std::move(running);
        job_thread_.start(running_.get());
    }

    // Called once running_->done is seen set: the job thread is done with it.
    void finish_job() {
        std::unique_ptr<RunningJob> done = std::move(running_);
        const jobs::Job& job = done->job;
        auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - done->started);
        if (!done->ok)
            log("INFO", "job ", printable(job.id), " (", job.name, ") failed after ",
                took.count(), "ms: ", done->code, ": ", done->exc_type, ": ", done->result);
        else if (options_.verbose)
            log("INFO", "job ", printable(job.id), " (", job.name, ") done in ", took.count(),
                "ms, ", done->result.size(), " bytes");
        if (!socket_) {
            log("WARNING", "job ", printable(job.id),
                " ended after the broker connection was lost; its result is dropped");
            return;
        }
        if (done->ok)
            send(mdp::reply_ok(done->client, job.id, std::move(done->result)));
        else
            send(mdp::reply_error(done->client, job.id, done->code, done->result,
                                  done->exc_type));
        ++jobs_done_;
    }

    // SIGTERM/SIGINT, once idle: DISCONNECT only when we hold no job, so the
    // broker requeues a job that crossed it on the wire (PROTOCOL.rst).
    int retire() {
        log("INFO", "stopping on signal after ", jobs_done_, " jobs");
        if (socket_) {
            send(mdp::command(mdp::DISCONNECT));
            close_socket(1000);  // linger: let the DISCONNECT reach the broker
        }
        return EXIT_OK;
    }

    Options options_;
    milliseconds heartbeat_;
    void* context_;
    void* socket_ = nullptr;
    Clock::time_point broker_expiry_{}, next_heartbeat_{}, reconnect_at_{};
    std::optional<Clock::time_point> no_broker_since_;
    milliseconds backoff_ = FIRST_BACKOFF;
    std::unique_ptr<RunningJob> running_;
    unsigned long jobs_done_ = 0;
    // Declared after running_, so destroyed (joined) before the job it may run.
    JobThread job_thread_;
};

}  // namespace

int main(int argc, char** argv) {
    Options options = parse_options(argc, argv);
    try {
        install_signal_handlers();
        Worker worker(std::move(options));
        return worker.run();
    } catch (const std::exception& error) {
        log("ERROR", error.what());
        return EXIT_ERROR;
    }
}
