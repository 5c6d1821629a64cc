// The jobs this worker runs: pure computations, no sockets.
#pragma once

#include <chrono>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>

namespace jobs {

using Clock = std::chrono::steady_clock;

inline const char* const NAMES = "echo, sha256";

struct Job {
    std::string id;
    std::string name;  // the `job` header, or the worker's --job
    std::string data;
    std::map<std::string, std::string> headers;
    std::optional<Clock::time_point> deadline;  // from the request's ttl_ms
};

// The job asked for does not exist, or its input is not what it expects.
class JobError : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The job's deadline passed while it ran: its client no longer waits.
class JobTimeout : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

bool exists(const std::string& name);

// The job's result; throws on failure.
std::string run(const Job& job);

// Exported for the command line's --help.
inline const unsigned long MAX_ROUNDS = 1000000000UL;

}  // namespace jobs
