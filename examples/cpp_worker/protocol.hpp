// Frames in, frames out: the worker side of 7/MDP with the powerhose/1
// extension, as PROTOCOL.rst describes it.  Pure functions over lists of
// frames, no sockets: the C++ twin of pyramid_powerhose/protocol.py.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace mdp {

using Frames = std::vector<std::string>;  // one std::string per frame, binary-safe

inline const std::string WORKER = "MDPW01";
inline const std::string READY = "\x01";
inline const std::string REQUEST = "\x02";
inline const std::string REPLY = "\x03";
inline const std::string HEARTBEAT = "\x04";
inline const std::string DISCONNECT = "\x05";
inline const std::string INFO = "\x08";  // powerhose/1: who the worker is
inline const std::size_t MAX_ABOUT_LENGTH = 255;

inline const std::string EXT_TOKEN = "powerhose/1";
inline const std::string STATUS_OK = "OK";
inline const std::string STATUS_ERROR = "ERR";

// Error codes of an ERR reply (PROTOCOL.rst, "Error codes").
inline const std::string ERR_EXECUTION = "ExecutionError";
inline const std::string ERR_TIMEOUT = "TimeoutError";

inline const int LIVENESS = 3;  // heartbeats missed before a peer is dead

class ProtocolError : public std::runtime_error {
    using std::runtime_error::runtime_error;
};

// An extended REQUEST, as the broker sends it to a powerhose/1 worker.
struct Request {
    std::string client;  // opaque address, copied into the REPLY
    std::string job_id;  // opaque, 1-255 bytes, copied into the REPLY
    long long ttl_ms = 0;  // 0: no deadline
    std::string data;
    std::map<std::string, std::string> headers;
};

struct BrokerCommand {
    std::string command;
    Request request;  // REQUEST only
};

inline Frames ready(const std::string& service) {
    return {"", WORKER, READY, service, EXT_TOKEN};
}

// INFO, sent right after READY: "pid@host", for the broker's stats.
inline Frames info(std::string about) {
    if (about.size() > MAX_ABOUT_LENGTH) about.resize(MAX_ABOUT_LENGTH);
    return {"", WORKER, INFO, std::move(about)};
}

inline Frames command(const std::string& cmd) {  // HEARTBEAT or DISCONNECT
    return {"", WORKER, cmd};
}

inline Frames reply_ok(const std::string& client, const std::string& job_id,
                       std::string result) {
    return {"", WORKER, REPLY, client, "", job_id, STATUS_OK, std::move(result)};
}

// All four payload frames are always present (PROTOCOL.rst).
inline Frames reply_error(const std::string& client, const std::string& job_id,
                          const std::string& code, const std::string& message,
                          const std::string& exc_type, const std::string& traceback = "") {
    return {"", WORKER, REPLY, client, "", job_id, STATUS_ERROR,
            code, message, exc_type, traceback};
}

inline long long parse_ttl(const std::string& frame) {
    if (frame.empty() || frame.size() > 12 ||
        frame.find_first_not_of("0123456789") != std::string::npos)
        throw ProtocolError("ttl must be decimal milliseconds");
    return std::stoll(frame);
}

// ["", MDPW01, command, ...] from the broker's ROUTER.
inline BrokerCommand parse_broker_command(Frames frames) {
    if (frames.size() < 3 || !frames[0].empty() || frames[1] != WORKER)
        throw ProtocolError("not an MDPW01 command");
    BrokerCommand cmd{frames[2], {}};
    if (cmd.command == REQUEST) {
        // ["", MDPW01, 0x02, client, "", job_id, ttl_ms, data, key1, value1, ...]
        if (frames.size() < 8 || !frames[4].empty())
            throw ProtocolError("REQUEST needs client, empty frame, job id, ttl and data");
        if ((frames.size() - 8) % 2)
            throw ProtocolError("REQUEST headers must come as key/value frame pairs");
        if (frames[5].empty() || frames[5].size() > 255)
            throw ProtocolError("job id must be 1 to 255 bytes");
        Request& req = cmd.request;
        req.client = std::move(frames[3]);
        req.job_id = std::move(frames[5]);
        req.ttl_ms = parse_ttl(frames[6]);
        req.data = std::move(frames[7]);
        for (size_t i = 8; i < frames.size(); i += 2)
            req.headers[frames[i]] = std::move(frames[i + 1]);
        return cmd;
    }
    if (cmd.command == HEARTBEAT || cmd.command == DISCONNECT) return cmd;
    throw ProtocolError("unexpected command from broker");
}

}  // namespace mdp
