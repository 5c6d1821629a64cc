// pyramid_powerhose._nbroker: the broker's message loop in C++.
//
// This is a port of pyramid_powerhose/broker.py, which is the reference
// implementation: the same frames (protocol.py), the same dispatch (LRU idle
// workers first, then busy workers with credit left), the same timers,
// errors, log lines and statistics.  When the two disagree, broker.py is
// right and this file is wrong.  The layout follows broker.py: the wire
// helpers, then PendingJob, WorkerRef, Service and a Broker whose methods
// are named after the Python ones.
//
// Why C++: the Python loop spends some 60 us of interpreter time per job.
// Here a message costs a few libzmq calls: frames are received into reused
// zmq_msg_t, moved into the job that needs them and passed on by reference
// count (or moved) rather than copied, and jobs come from a free list.
//
// Only libzmq's C API and CPython's C API are used.  serve() runs the whole
// loop with the GIL released and never calls Python while it runs; Python
// keeps what happens once per process (settings, endpoint locks, the log
// file; see native_broker.py).

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <zmq.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using std::string;
using std::string_view;

// -- protocol.py's constants --------------------------------------------------

constexpr string_view MDP_CLIENT{"MDPC01"};
constexpr string_view MDP_WORKER{"MDPW01"};
constexpr string_view READY{"\x01", 1};
constexpr string_view REQUEST{"\x02", 1};
constexpr string_view REPLY{"\x03", 1};
constexpr string_view HEARTBEAT{"\x04", 1};
constexpr string_view DISCONNECT{"\x05", 1};

constexpr string_view MMI_PREFIX{"mmi."};
constexpr string_view MMI_SERVICE{"mmi.service"};
constexpr string_view MMI_STATS{"mmi.stats"};
constexpr string_view MMI_PING{"mmi.ping"};
constexpr string_view MMI_FOUND{"200"};
constexpr string_view MMI_NOT_FOUND{"404"};
constexpr string_view MMI_NOT_IMPLEMENTED{"501"};

constexpr string_view EXT_CLIENT{"PHC01"};
constexpr string_view EXT_TOKEN{"powerhose/1"};
constexpr string_view STATUS_OK{"OK"};
constexpr string_view STATUS_ERROR{"ERR"};

constexpr const char* ERR_TIMEOUT = "TimeoutError";
constexpr const char* ERR_NO_WORKER = "NoWorkerError";
constexpr const char* ERR_WORKER_LOST = "WorkerLostError";
constexpr const char* ERR_TOO_LARGE = "JobTooLargeError";
constexpr const char* ERR_BAD_REQUEST = "ProtocolError";

constexpr size_t MAX_SERVICE_LENGTH = 255;
constexpr size_t MAX_JOB_ID_LENGTH = 255;
constexpr int MAX_CREDIT = 64;

// broker.py's tuning: messages read from one socket per poll, and the
// average job time below which a busy worker gets a second job.
constexpr int BATCH = 64;
constexpr double PREFETCH_BELOW = 0.1;  // seconds

// -- clocks -------------------------------------------------------------------

double monotonic() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double wall_time() {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// -- text: what Python's %r, .hex(), .decode() and json.dumps produce ---------

string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

string vformat(const char* fmt, va_list ap) {
    va_list copy;
    va_copy(copy, ap);
    int len = vsnprintf(nullptr, 0, fmt, copy);
    va_end(copy);
    if (len <= 0) return string();
    string out(static_cast<size_t>(len) + 1, '\0');
    vsnprintf(&out[0], out.size(), fmt, ap);
    out.resize(static_cast<size_t>(len));
    return out;
}

string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    string out = vformat(fmt, ap);
    va_end(ap);
    return out;
}

bool starts_with(string_view s, string_view prefix) {
    return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

bool is_digits(string_view s) {  // bytes.isdigit(): non-empty, ASCII digits only
    if (s.empty()) return false;
    for (char c : s)
        if (c < '0' || c > '9') return false;
    return true;
}

string hex(string_view bytes) {  // bytes.hex()
    static const char digits[] = "0123456789abcdef";
    string out;
    out.reserve(bytes.size() * 2);
    for (unsigned char c : bytes) {
        out += digits[c >> 4];
        out += digits[c & 15];
    }
    return out;
}

// Python's choice of quotes for a repr: ' unless the text holds ' and not ".
char repr_quote(string_view bytes) {
    bool single = bytes.find('\'') != string_view::npos;
    bool dbl = bytes.find('"') != string_view::npos;
    return single && !dbl ? '"' : '\'';
}

// The escapes bytes and str reprs share; false if ``c`` needs none of them.
bool append_common_escape(string& out, uint32_t c, char quote) {
    if (c == static_cast<uint32_t>(quote) || c == '\\') {
        out += '\\';
        out += static_cast<char>(c);
    } else if (c == '\t') {
        out += "\\t";
    } else if (c == '\n') {
        out += "\\n";
    } else if (c == '\r') {
        out += "\\r";
    } else {
        return false;
    }
    return true;
}

string bytes_repr(string_view bytes) {  // repr(bytes)
    char quote = repr_quote(bytes);
    string out = "b";
    out += quote;
    for (unsigned char c : bytes) {
        if (append_common_escape(out, c, quote)) continue;
        if (c < 0x20 || c >= 0x7f) {
            char buf[8];
            snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else {
            out += static_cast<char>(c);
        }
    }
    out += quote;
    return out;
}

// One code point from UTF-8 as CPython's decoder reads it: an invalid
// sequence yields U+FFFD once per maximal invalid subpart (the Unicode
// recommendation CPython follows), so "replace" decoding matches exactly.
uint32_t utf8_next(string_view s, size_t& i, bool& ok) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    size_t n = s.size();
    unsigned char b0 = p[i];
    ok = true;
    if (b0 < 0x80) {
        ++i;
        return b0;
    }
    int need;
    unsigned char lo = 0x80, hi = 0xbf;
    uint32_t cp;
    if (b0 >= 0xc2 && b0 <= 0xdf) {
        need = 1;
        cp = b0 & 0x1f;
    } else if (b0 >= 0xe0 && b0 <= 0xef) {
        need = 2;
        cp = b0 & 0x0f;
        if (b0 == 0xe0) lo = 0xa0;
        if (b0 == 0xed) hi = 0x9f;  // no surrogates
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
        need = 3;
        cp = b0 & 0x07;
        if (b0 == 0xf0) lo = 0x90;
        if (b0 == 0xf4) hi = 0x8f;  // nothing above U+10FFFF
    } else {
        ok = false;
        ++i;
        return 0xfffd;
    }
    for (int k = 1; k <= need; ++k) {
        unsigned char b = i + k < n ? p[i + k] : 0;
        bool good = i + k < n && (k == 1 ? b >= lo && b <= hi : b >= 0x80 && b <= 0xbf);
        if (!good) {
            ok = false;
            i += k;
            return 0xfffd;
        }
        cp = (cp << 6) | (b & 0x3f);
    }
    i += need + 1;
    return cp;
}

bool utf8_valid(string_view s) {
    size_t i = 0;
    bool ok = true;
    while (i < s.size()) {
        if (static_cast<unsigned char>(s[i]) < 0x80) {
            ++i;
            continue;
        }
        utf8_next(s, i, ok);
        if (!ok) return false;
    }
    return true;
}

void utf8_append(string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xc0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xe0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
        out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
        out += static_cast<char>(0xf0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
        out += static_cast<char>(0x80 | (cp & 0x3f));
    }
}

string utf8_replace(string_view s) {  // s.decode("utf-8", "replace").encode()
    string out;
    out.reserve(s.size());
    size_t i = 0;
    bool ok;
    while (i < s.size()) utf8_append(out, utf8_next(s, i, ok));
    return out;
}

// str.isprintable() for one code point.  Exact for ASCII and Latin-1; beyond,
// the format, separator, private-use and noncharacter code points are listed,
// unassigned ones are not (that would take the Unicode database).
bool py_printable(uint32_t cp) {
    if (cp < 0xa1) return cp >= 0x20 && cp < 0x7f;
    static const uint32_t singles[] = {0xad,   0x061c, 0x06dd, 0x070f,  0x08e2,  0x180e,
                                       0x1680, 0x3000, 0xfeff, 0x110bd, 0x110cd, 0xe0001};
    for (uint32_t single : singles)
        if (cp == single) return false;
    static const uint32_t ranges[][2] = {
        {0x0600, 0x0605},   {0x2000, 0x200f},   {0x2028, 0x202f}, {0x205f, 0x206f},
        {0xd800, 0xf8ff},   {0xfff0, 0xfffb},   {0x1bca0, 0x1bca3}, {0x1d173, 0x1d17a},
        {0xe0020, 0xe007f}, {0xf0000, 0x10ffff}};
    for (const auto& range : ranges)
        if (cp >= range[0] && cp <= range[1]) return false;
    return (cp & 0xfffe) != 0xfffe;  // U+xFFFE and U+xFFFF are noncharacters
}

// repr(name.decode("utf-8", "replace")), as broker.py's _name() gives it.
string str_repr(string_view bytes) {
    char quote = repr_quote(bytes);
    string out(1, quote);
    size_t i = 0;
    bool ok;
    while (i < bytes.size()) {
        uint32_t cp = utf8_next(bytes, i, ok);
        if (append_common_escape(out, cp, quote)) continue;
        if (py_printable(cp)) {
            utf8_append(out, cp);
        } else {
            char buf[16];
            if (cp < 0x100)
                snprintf(buf, sizeof buf, "\\x%02x", cp);
            else if (cp < 0x10000)
                snprintf(buf, sizeof buf, "\\u%04x", cp);
            else
                snprintf(buf, sizeof buf, "\\U%08x", cp);
            out += buf;
        }
    }
    out += quote;
    return out;
}

// A JSON string as json.dumps writes it (ensure_ascii) from valid UTF-8.
string json_string(string_view utf8) {
    string out = "\"";
    size_t i = 0;
    bool ok;
    char buf[16];
    while (i < utf8.size()) {
        uint32_t cp = utf8_next(utf8, i, ok);
        switch (cp) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            default:
                if (cp >= 0x20 && cp < 0x7f) {
                    out += static_cast<char>(cp);
                } else if (cp < 0x10000) {
                    snprintf(buf, sizeof buf, "\\u%04x", cp);
                    out += buf;
                } else {
                    uint32_t v = cp - 0x10000;
                    snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
                    out += buf;
                }
        }
    }
    out += '"';
    return out;
}

double round3(double x) {  // round(x, 3): correctly rounded, like printf
    if (!std::isfinite(x) || std::fabs(x) >= 1e15) return x;
    char buf[64];
    snprintf(buf, sizeof buf, "%.3f", x);
    return strtod(buf, nullptr);
}

string py_float_repr(double x) {  // repr(float): the shortest digits that round-trip
    if (std::isnan(x)) return "NaN";
    if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
    if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
    char buf[48];
    for (int precision = 1; precision <= 17; ++precision) {
        snprintf(buf, sizeof buf, "%.*e", precision - 1, x);
        if (strtod(buf, nullptr) == x) break;
    }
    string digits;
    const char* p = buf;
    bool negative = *p == '-';
    if (negative) ++p;
    for (; *p && *p != 'e'; ++p)
        if (*p >= '0' && *p <= '9') digits += *p;
    int exponent = *p == 'e' ? atoi(p + 1) : 0;
    while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
    int point = exponent + 1;  // digits before the decimal point
    string out = negative ? "-" : "";
    if (point <= -4 || point > 16) {
        out += digits[0];
        if (digits.size() > 1) out += "." + digits.substr(1);
        snprintf(buf, sizeof buf, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
        out += buf;
    } else if (point <= 0) {
        out += "0." + string(static_cast<size_t>(-point), '0') + digits;
    } else if (static_cast<size_t>(point) >= digits.size()) {
        out += digits + string(static_cast<size_t>(point) - digits.size(), '0') + ".0";
    } else {
        out += digits.substr(0, static_cast<size_t>(point)) + "." +
               digits.substr(static_cast<size_t>(point));
    }
    return out;
}

// -- errors -------------------------------------------------------------------

// A message that does not follow the protocol: logged and dropped (_drain).
struct ProtocolError {
    string message;
};

[[noreturn]] void protocol_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

void protocol_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    ProtocolError error{vformat(fmt, ap)};
    va_end(ap);
    throw error;
}

// A libzmq call failed in a way broker.py would not catch: the broker stops.
struct ZmqFatal {
    int err;
};

// -- logging: logs.FORMAT, written straight to the log file descriptor ----------

class Logger {
  public:
    Logger(int fd, bool debug) : fd_(fd), debug_(debug), pid_(static_cast<long>(getpid())) {}

    bool debug_enabled() const { return debug_; }

#define PH_LOG_METHOD(name, level, enabled)                                   \
    __attribute__((format(printf, 2, 3))) void name(const char* fmt, ...) { \
        if (!(enabled)) return;                        \
        va_list ap;                                    \
        va_start(ap, fmt);                             \
        emit(level, fmt, ap);                          \
        va_end(ap);                                    \
    }
    PH_LOG_METHOD(debug, "DEBUG", debug_)
    PH_LOG_METHOD(info, "INFO", true)
    PH_LOG_METHOD(warning, "WARNING", true)
    PH_LOG_METHOD(error, "ERROR", true)
#undef PH_LOG_METHOD

  private:
    void emit(const char* level, const char* fmt, va_list ap) {
        timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        tm local;
        localtime_r(&ts.tv_sec, &local);
        char stamp[96];
        size_t len = strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &local);
        snprintf(stamp + len, sizeof stamp - len, ",%03ld [%ld] %s pyramid_powerhose.broker: ",
                 ts.tv_nsec / 1000000, pid_, level);
        string line = stamp;
        line += vformat(fmt, ap);
        line += '\n';
        const char* p = line.data();
        size_t left = line.size();
        while (left) {
            ssize_t n = write(fd_, p, left);
            if (n < 0) {
                if (errno == EINTR) continue;
                return;  // like logging: a broken log never stops the broker
            }
            p += n;
            left -= static_cast<size_t>(n);
        }
    }

    int fd_;
    bool debug_;
    long pid_;
};

// -- frames -------------------------------------------------------------------

// One zmq_msg_t, always initialised; moving it moves the frame, not its bytes.
class Msg {
  public:
    Msg() noexcept { zmq_msg_init(&m_); }
    ~Msg() { zmq_msg_close(&m_); }
    Msg(Msg&& other) noexcept {
        zmq_msg_init(&m_);
        zmq_msg_move(&m_, &other.m_);
    }
    Msg& operator=(Msg&& other) noexcept {
        if (this != &other) zmq_msg_move(&m_, &other.m_);
        return *this;
    }
    Msg(const Msg&) = delete;
    Msg& operator=(const Msg&) = delete;

    zmq_msg_t* get() { return &m_; }
    size_t size() const { return zmq_msg_size(const_cast<zmq_msg_t*>(&m_)); }
    string_view view() const {
        auto* m = const_cast<zmq_msg_t*>(&m_);
        return {static_cast<const char*>(zmq_msg_data(m)), zmq_msg_size(m)};
    }
    void reset() {
        zmq_msg_close(&m_);
        zmq_msg_init(&m_);
    }
    void assign(string_view bytes) {
        zmq_msg_close(&m_);
        if (zmq_msg_init_size(&m_, bytes.size()) != 0) {
            zmq_msg_init(&m_);
            throw std::bad_alloc();
        }
        if (!bytes.empty()) memcpy(zmq_msg_data(&m_), bytes.data(), bytes.size());
    }
    void copy_from(Msg& other) {  // shares a large frame's buffer (reference count)
        if (zmq_msg_copy(&m_, &other.m_) != 0) throw ZmqFatal{zmq_errno()};
    }
    // libzmq receives frames up to its read batch (ZMQ_IN_BATCH_SIZE, 8 KB by
    // default) into a shared buffer and hands them out by reference: one such
    // frame kept for long keeps the whole buffer.  Frames meant to wait get
    // their own copy; larger frames have their own allocation already.
    void own() {
        if (size() > SHARED_READ_BUFFER) return;
        Msg copy;
        copy.assign(view());
        *this = std::move(copy);
    }
    static constexpr size_t SHARED_READ_BUFFER = 8192;

  private:
    zmq_msg_t m_;
};

// A FIFO that keeps its storage: deque-like, without an allocation every few
// dozen pushes.  Popped slots are reset so that no reference lingers.
template <class T>
class Ring {
  public:
    Ring() = default;
    Ring(Ring&& other) noexcept
        : buf_(std::move(other.buf_)), cap_(other.cap_), head_(other.head_), size_(other.size_) {
        other.cap_ = other.head_ = other.size_ = 0;
    }
    Ring& operator=(Ring&&) = delete;
    Ring(const Ring&) = delete;

    bool empty() const { return size_ == 0; }
    size_t size() const { return size_; }
    T& operator[](size_t i) { return buf_[(head_ + i) & (cap_ - 1)]; }
    T& front() { return buf_[head_]; }

    void push_back(T value) {
        if (size_ == cap_) grow();
        (*this)[size_] = std::move(value);
        ++size_;
    }
    void push_front(T value) {
        if (size_ == cap_) grow();
        head_ = (head_ + cap_ - 1) & (cap_ - 1);
        buf_[head_] = std::move(value);
        ++size_;
    }
    T pop_front() {
        T value = std::move(buf_[head_]);
        buf_[head_] = T();
        head_ = (head_ + 1) & (cap_ - 1);
        --size_;
        return value;
    }
    void erase(size_t i) {
        for (; i + 1 < size_; ++i) (*this)[i] = std::move((*this)[i + 1]);
        (*this)[size_ - 1] = T();
        --size_;
    }
    void truncate(size_t n) {
        while (size_ > n) {
            (*this)[size_ - 1] = T();
            --size_;
        }
    }

  private:
    void grow() {
        size_t cap = cap_ ? cap_ * 2 : 8;
        std::unique_ptr<T[]> buf(new T[cap]);
        for (size_t i = 0; i < size_; ++i) buf[i] = std::move((*this)[i]);
        buf_ = std::move(buf);
        cap_ = cap;
        head_ = 0;
    }

    std::unique_ptr<T[]> buf_;
    size_t cap_ = 0, head_ = 0, size_ = 0;
};

// -- PendingJob -------------------------------------------------------------------

// A client's request, queued or in flight: the frames it arrived with.
struct PendingJob {
    Msg address;  // the client's routing id
    Msg service;
    Msg job_id;  // the client's (PHC01), or "mdp-<n>" made up for a plain client
    Msg data;  // PHC01: the data frame; plain clients keep their body instead
    Msg joined;  // a plain client's body frames joined, once an extended worker needs it
    std::vector<Msg> body;  // the plain client's body frames, kept as sent
    std::vector<Msg> headers;  // key, value, ... as the Python dict would hold them
    bool extended = false;
    bool has_joined = false;
    bool has_deadline = false;
    double received = 0, sent = 0, deadline = 0;
    long long ttl = 0;  // request.ttl_ms, as last sent

    long long ttl_ms(double now) const {
        if (!has_deadline) return 0;
        return std::max<long long>(1, static_cast<long long>((deadline - now) * 1000));
    }

    Msg& request_data() {  // request.data
        if (extended) return data;
        if (body.size() == 1) return body[0];
        if (!has_joined) {
            size_t size = 0;
            for (auto& frame : body) size += frame.size();
            string bytes;
            bytes.reserve(size);
            for (auto& frame : body) bytes.append(frame.view());
            joined.assign(bytes);
            has_joined = true;
        }
        return joined;
    }

    void own_frames() {  // before waiting in a queue (see Msg::own)
        address.own();
        service.own();
        job_id.own();
        data.own();
        for (auto& frame : body) frame.own();
        for (auto& frame : headers) frame.own();
    }

    void reset() {
        address.reset();
        service.reset();
        job_id.reset();
        data.reset();
        joined.reset();
        body.clear();
        headers.clear();
        if (body.capacity() > 64) std::vector<Msg>().swap(body);  // a freak message's size
        if (headers.capacity() > 64) std::vector<Msg>().swap(headers);  // is not kept pooled
        has_joined = has_deadline = false;
        ttl = 0;
    }
};

// Jobs come from here and go back here, so their frame vectors keep their capacity.
class JobPool {
  public:
    JobPool() { free_.reserve(KEEP); }
    ~JobPool() {
        for (PendingJob* job : free_) delete job;
    }
    JobPool(const JobPool&) = delete;
    JobPool& operator=(const JobPool&) = delete;

    PendingJob* take() {
        if (free_.empty()) return new PendingJob;
        PendingJob* job = free_.back();
        free_.pop_back();
        return job;
    }
    void give(PendingJob* job) noexcept {
        job->reset();
        if (free_.size() < KEEP)
            free_.push_back(job);  // never reallocates: reserved
        else
            delete job;
    }

  private:
    static constexpr size_t KEEP = 1024;
    std::vector<PendingJob*> free_;
};

struct JobReturn {
    JobPool* pool = nullptr;
    void operator()(PendingJob* job) const noexcept { pool->give(job); }
};
using JobPtr = std::unique_ptr<PendingJob, JobReturn>;

// A service's queue; keeps the broker's count of queued jobs for _poll_timeout.
class JobQueue {
  public:
    explicit JobQueue(size_t& total) : total_(total) {}
    ~JobQueue() { total_ -= ring_.size(); }

    bool empty() const { return ring_.empty(); }
    size_t size() const { return ring_.size(); }
    JobPtr& operator[](size_t i) { return ring_[i]; }
    void push_back(JobPtr job) {
        ring_.push_back(std::move(job));
        ++total_;
    }
    void push_front(JobPtr job) {
        ring_.push_front(std::move(job));
        ++total_;
    }
    JobPtr pop_front() {
        --total_;
        return ring_.pop_front();
    }
    void truncate(size_t n) {
        if (n >= ring_.size()) return;
        total_ -= ring_.size() - n;
        ring_.truncate(n);
    }
    void clear() { truncate(0); }

  private:
    Ring<JobPtr> ring_;
    size_t& total_;
};

// -- WorkerRef and Service --------------------------------------------------------

struct Service;

// What the broker knows of one connected worker.  ``jobs`` are the jobs sent
// to it and not yet answered, oldest (running) first; ``credit`` is how many
// it accepts at once (1 for plain MDP).
struct WorkerRef {
    string address;
    Service* service = nullptr;
    bool extended = false;
    int credit = 1;
    Ring<JobPtr> jobs;
    double expiry = 0;
    bool spare = false;  // listed in service->spare
    bool vanished = false;  // a send to it failed: its connection is gone
    bool listed = false;  // counted in service->workers (Python: svc.workers)
    double last_reply = 0;
};
using WorkerPtr = std::shared_ptr<WorkerRef>;  // idle/spare/vanished lists may outlive the registration

// One service: its workers, the idle ones in LRU order, its queue.  ``spare``
// lists busy workers that accept one more job (credit > 1): they are used
// only when no worker is idle.
struct Service {
    Service(string_view name_, size_t& queued) : name(name_), queue(queued) {}

    string name;
    size_t workers = 0;
    Ring<WorkerPtr> idle;  // front: idle the longest
    Ring<WorkerPtr> spare;
    JobQueue queue;
    unsigned long long done = 0;
    unsigned long long failed = 0;
    bool timed = false;  // job_time is not None
    double job_time = 0;  // moving average of job run times, seconds

    void ran(double seconds) {
        job_time = timed ? job_time + 0.2 * (seconds - job_time) : seconds;
        timed = true;
    }
    // Jobs ``worker`` may hold now: its credit when jobs are short, else 1.
    size_t capacity(const WorkerRef& worker) const {
        return static_cast<size_t>(timed && job_time < PREFETCH_BELOW ? worker.credit : 1);
    }
};

// Who a reply or an error goes to: a client message's or a job's first frames.
struct ClientRef {
    string_view address, service, job_id;
    bool extended;
};

ClientRef client_of(const PendingJob& job) {
    return {job.address.view(), job.service.view(), job.job_id.view(), job.extended};
}

struct Settings {
    string frontend, backend;
    double heartbeat = 1.0;
    int liveness = 3;
    long long max_job_size = 0;
    double no_worker_timeout = 1.0;
    double grace = 10.0;
    long parent_pid = 0;
    int log_fd = 2;
    bool debug = false;
};

// What serve() raises, decided without the GIL.
struct Failure {
    enum Kind { NONE, OS_ERROR, RUNTIME_ERROR, MEMORY_ERROR } kind = NONE;
    int err = 0;
    string message;
};

// -- signals: SIGTERM and SIGINT start the graceful stop --------------------------

volatile sig_atomic_t g_stop_requested = 0;
volatile sig_atomic_t g_wake_fd = -1;  // the self-pipe: a signal wakes zmq_poll at once

extern "C" void on_stop_signal(int) {
    int saved = errno;
    g_stop_requested = 1;
    int fd = g_wake_fd;
    if (fd >= 0) {
        char byte = 1;
        ssize_t written = write(fd, &byte, 1);
        (void)written;  // a full pipe already wakes the loop
    }
    errno = saved;
}

// Installs the handlers for the life of serve() and puts the previous ones
// (Python's) back.  One serve() at a time per process.
class SignalGuard {
  public:
    SignalGuard() {
        if (pipe2(fds_, O_NONBLOCK | O_CLOEXEC) != 0) {
            err_ = errno;
            fds_[0] = fds_[1] = -1;
            return;
        }
        g_stop_requested = 0;
        g_wake_fd = fds_[1];
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_handler = on_stop_signal;
        sigemptyset(&action.sa_mask);
        action.sa_flags = SA_RESTART;  // poll() still returns EINTR
        sigaction(SIGTERM, &action, &old_term_);
        sigaction(SIGINT, &action, &old_int_);
        installed_ = true;
    }
    ~SignalGuard() {
        if (installed_) {
            sigaction(SIGTERM, &old_term_, nullptr);
            sigaction(SIGINT, &old_int_, nullptr);
        }
        g_wake_fd = -1;
        if (fds_[0] >= 0) close(fds_[0]);
        if (fds_[1] >= 0) close(fds_[1]);
    }
    SignalGuard(const SignalGuard&) = delete;
    SignalGuard& operator=(const SignalGuard&) = delete;

    int error() const { return err_; }
    int wake_fd() const { return fds_[0]; }
    void drain() const {
        char buf[64];
        while (read(fds_[0], buf, sizeof buf) > 0) {
        }
    }

  private:
    int fds_[2] = {-1, -1};
    int err_ = 0;
    bool installed_ = false;
    struct sigaction old_term_, old_int_;
};

// -- the broker -------------------------------------------------------------------

class Broker {
  public:
    Broker(const Settings& settings, const SignalGuard& signals)
        : settings_(settings),
          signals_(signals),
          log_(settings.log_fd, settings.debug),
          heartbeat_(settings.heartbeat),
          liveness_(settings.heartbeat * settings.liveness),
          started_(wall_time()),
          parent_(settings.parent_pid) {}

    ~Broker() { close(); }
    Broker(const Broker&) = delete;
    Broker& operator=(const Broker&) = delete;

    // -- life cycle ---------------------------------------------------------------

    // Binds both ROUTERs and the monitor; on failure ``failure`` says why.
    bool bind(Failure& failure) {
        context_ = zmq_ctx_new();
        if (!context_) throw ZmqFatal{zmq_errno()};
        frontend_ = bind_router(settings_.frontend, failure);
        if (!frontend_) return false;
        backend_ = bind_router(settings_.backend, failure);
        if (!backend_) return false;
        // Sending to a worker that went away must fail, not vanish: that is
        // how a dead worker's job is failed fast (see handle_monitor).
        set_int(backend_, ZMQ_ROUTER_MANDATORY, 1);
        char address[80];
        snprintf(address, sizeof address, "inproc://powerhose-broker-monitor-%p",
                 static_cast<void*>(this));
        if (zmq_socket_monitor(backend_, address, ZMQ_EVENT_DISCONNECTED) != 0)
            throw ZmqFatal{zmq_errno()};
        monitor_ = zmq_socket(context_, ZMQ_PAIR);
        if (!monitor_) throw ZmqFatal{zmq_errno()};
        set_int(monitor_, ZMQ_LINGER, 0);
        if (zmq_connect(monitor_, address) != 0) throw ZmqFatal{zmq_errno()};
        log_.info("broker pid %ld: frontend %s, backend %s, heartbeat %.2fs",
                  static_cast<long>(getpid()), settings_.frontend.c_str(),
                  settings_.backend.c_str(), heartbeat_);
        return true;
    }

    // Closes the sockets once the last replies have left (linger, up to 1 s).
    void close() {
        if (backend_ && monitor_) zmq_socket_monitor(backend_, nullptr, 0);
        for (void** sock : {&monitor_, &frontend_, &backend_}) {
            if (*sock) zmq_close(*sock);
            *sock = nullptr;
        }
        if (context_) {
            // Without term() a process exiting right after a final reply
            // can take that reply with it.
            while (zmq_ctx_term(context_) != 0 && zmq_errno() == EINTR) {
            }
            context_ = nullptr;
        }
    }

    void request_stop() {
        if (!stopping_) {
            log_.info("broker stopping: finishing accepted jobs (grace %.1fs)", settings_.grace);
            stopping_ = true;
            stopping_since_ = monotonic();
        }
    }

    // -- the loop -------------------------------------------------------------------

    // Serves until stopped; returns once every accepted job is settled.
    //
    // The loop polls the sockets' ZMQ_FDs itself rather than calling
    // zmq_poll.  Each question to a socket (ZMQ_EVENTS, or a receive that
    // finds nothing) costs a getpid and a poll system call inside libzmq,
    // and zmq_poll asks every socket twice per wake-up (before sleeping
    // and after); here only a socket whose descriptor fired, or that was
    // used since it was last asked (a send or receive may take its
    // wake-up signal), is asked.
    void run() {
        void* const sockets[3] = {frontend_, backend_, monitor_};
        pollfd fds[4];
        for (int i = 0; i < 3; ++i) {
            size_t size = sizeof fds[i].fd;
            if (zmq_getsockopt(sockets[i], ZMQ_FD, &fds[i].fd, &size) != 0)
                throw ZmqFatal{zmq_errno()};
            fds[i].events = POLLIN;
            fds[i].revents = 0;
        }
        fds[3] = {signals_.wake_fd(), POLLIN, 0};
        for (bool& stale : stale_) stale = true;
        for (;;) {
            unsigned ready = 0;
            for (int i = 0; i < 3; ++i) {
                if (!stale_[i]) continue;
                stale_[i] = false;
                if (events(sockets[i]) & ZMQ_POLLIN) ready |= 1u << i;
            }
            if (ready == 0) {
                // Every socket was asked since it was last used: any new
                // message now makes its descriptor readable.
                int rc = ::poll(fds, 4, static_cast<int>(poll_timeout()));
                if (rc < 0 && errno != EINTR) throw ZmqFatal{errno};
                for (int i = 0; rc > 0 && i < 3; ++i)
                    if (fds[i].revents) stale_[i] = true;
                if (rc > 0 && (fds[3].revents & POLLIN)) signals_.drain();
            }
            if (g_stop_requested) {
                g_stop_requested = 0;
                request_stop();
            }
            if (ready & 1u) drain(frontend_, &Broker::handle_client);
            if (ready & 2u) drain(backend_, &Broker::handle_worker);
            if (ready & 4u) handle_monitor();
            if (!vanished_.empty()) bury_vanished();
            double now = monotonic();
            if (now >= next_expiry_) {
                expire_jobs(now);
                expire_workers(now);
                next_expiry_ = now + 0.05;
                if (parent_ != 0 && static_cast<long>(getppid()) != parent_) {
                    log_.warning("parent process %ld is gone", parent_);
                    parent_ = 0;
                    request_stop();
                }
            }
            if (now >= next_heartbeat_) {
                send_heartbeats();
                // 7/MDP peers following the zguide expect one every 2.5 s at most.
                next_heartbeat_ = now + std::min(heartbeat_, 2.5);
            }
            if (stopping_ && drained(now)) break;
        }
        disconnect_all();
    }

  private:
    using Handler = void (Broker::*)();

    long poll_timeout() const {
        if (probes_left_ || stopping_) return 50;
        if (queued_) return 50;
        return static_cast<long>(heartbeat_ * 1000);
    }

    void drain(void* sock, Handler handle) {
        for (int i = 0; i < BATCH; ++i) {
            if (!recv_message(sock)) return;
            try {
                (this->*handle)();
            } catch (const ProtocolError& exc) {
                log_.warning("dropped malformed message (%zu frames): %s", nin_,
                             exc.message.c_str());
            }
            release_input();
            // Asking is cheaper than a recv that fails, and most wake-ups
            // bring a single message.
            if (!(events(sock) & ZMQ_POLLIN)) {
                stale_[index_of(sock)] = false;  // asked after its last use
                return;
            }
        }
    }

    // -- clients ----------------------------------------------------------------------

    // parse_frontend, then broker.py's handle_client.
    void handle_client() {
        const size_t n = nin_;
        if (n < 5 || in_[1].size() != 0) protocol_error("bad frontend envelope (%zu frames)", n);
        string_view header = in_[2].view(), service = in_[3].view();
        check_service(service);
        bool extended;
        long long ttl = 0;
        if (header == MDP_CLIENT) {
            extended = false;
        } else if (header == EXT_CLIENT) {
            if (n < 7) protocol_error("PHC01 request needs job id, ttl and data");
            check_job_id(in_[4].view());
            ttl = decode_ttl(in_[5].view());
            check_headers(7, n);
            extended = true;
        } else {
            protocol_error("unknown client header %s", bytes_repr(header.substr(0, 10)).c_str());
        }

        ClientRef client{in_[0].view(), service, extended ? in_[4].view() : string_view(""),
                         extended};
        if (starts_with(service, MMI_PREFIX)) {
            string reply = mmi(service, extended);
            frontend_plain_reply(client, reply);
            return;
        }
        if (stopping_) {
            fail(client, ERR_NO_WORKER,
                 "broker at " + settings_.frontend + " is shutting down; retry shortly");
            return;
        }
        size_t size = 0;
        if (extended) {
            size = in_[6].size();
        } else {
            for (size_t i = 4; i < n; ++i) size += in_[i].size();
        }
        if (static_cast<unsigned long long>(size) >
            static_cast<unsigned long long>(settings_.max_job_size)) {
            fail(client, ERR_TOO_LARGE,
                 format("job of %zu bytes is larger than the broker's max job size (%lld bytes)",
                        size, settings_.max_job_size));
            return;
        }
        JobPtr job = make_job(extended, ttl);
        Service& svc = service_for(job->service.view());
        if (!svc.queue.empty() || !dispatch(svc, job)) {
            job->own_frames();
            svc.queue.push_back(std::move(job));
        }
    }

    // Moves the request's frames from the input into a PendingJob.
    JobPtr make_job(bool extended, long long ttl) {
        JobPtr job(pool_.take(), JobReturn{&pool_});
        PendingJob& j = *job;
        j.extended = extended;
        j.address = std::move(in_[0]);
        j.service = std::move(in_[3]);
        if (extended) {
            j.job_id = std::move(in_[4]);
            j.data = std::move(in_[6]);
            take_headers(j, 7, nin_);
        } else {
            char id[32];
            int len = snprintf(id, sizeof id, "mdp-%llu", ++mdp_ids_);
            j.job_id.assign(string_view(id, static_cast<size_t>(len)));
            for (size_t i = 4; i < nin_; ++i) j.body.emplace_back(std::move(in_[i]));
        }
        double now = monotonic();
        j.received = j.sent = now;
        j.ttl = ttl;
        j.has_deadline = ttl != 0;
        j.deadline = j.has_deadline ? now + static_cast<double>(ttl) / 1000.0 : 0;
        return job;
    }

    // Python keeps headers in a dict: a repeated key keeps its first place
    // and takes its last value.
    void take_headers(PendingJob& job, size_t first, size_t n) {
        size_t pairs = (n - first) / 2;
        auto key = [&](size_t i) { return in_[first + 2 * i].view(); };
        bool repeated = false;
        if (pairs > 1) {
            if (pairs <= 16) {
                for (size_t i = 1; i < pairs && !repeated; ++i)
                    for (size_t k = 0; k < i && !repeated; ++k) repeated = key(i) == key(k);
            } else {
                std::unordered_map<string_view, size_t> seen;
                for (size_t i = 0; i < pairs && !repeated; ++i)
                    repeated = !seen.emplace(key(i), i).second;
            }
        }
        if (!repeated) {
            for (size_t i = first; i < n; ++i) job.headers.emplace_back(std::move(in_[i]));
            return;
        }
        std::unordered_map<string_view, size_t> last;  // key -> pair holding its value
        for (size_t i = 0; i < pairs; ++i) last[key(i)] = i;
        for (size_t i = 0; i < pairs; ++i) {
            auto it = last.find(key(i));
            if (it == last.end()) continue;  // already taken at its first place
            job.headers.emplace_back().copy_from(in_[first + 2 * i]);
            job.headers.emplace_back().copy_from(in_[first + 2 * it->second + 1]);
            last.erase(it);
        }
    }

    // [address, "", header, service], and the job id for our clients: how
    // every reply to a client starts.
    void add_reply_head(const ClientRef& client) {
        add(client.address);
        add("");
        add(client.extended ? EXT_CLIENT : MDP_CLIENT);
        add(client.service);
        if (client.extended) add(client.job_id);
    }

    // The error reply (Reply.error) in the client's dialect.  A plain client
    // cannot be told an exception; it gets a readable body.
    void fail(const ClientRef& client, const char* code, const string& message) {
        add_reply_head(client);
        add(STATUS_ERROR);
        add(code);
        add(message);
        if (client.extended) {  // no exception type, no traceback
            add("");
            add("");
        }
        send_frontend();
        if (Service* svc = find_service(client.service)) svc->failed += 1;
        log_.info("job %s for %s failed: %s: %s", bytes_repr(client.job_id).c_str(),
                  bytes_repr(client.service).c_str(), code, message.c_str());
    }

    // A plain worker's (or MMI's) one-frame reply body, passed to a client.
    void frontend_plain_reply(const ClientRef& client, string_view data) {
        add_reply_head(client);
        if (client.extended) add(STATUS_OK);
        add(data);
        send_frontend();
    }

    string mmi(string_view service, bool extended) {
        if (service == MMI_SERVICE) {
            string joined;
            string_view data;
            if (extended) {
                data = in_[6].view();
            } else if (nin_ == 5) {
                data = in_[4].view();
            } else {
                for (size_t i = 4; i < nin_; ++i) joined.append(in_[i].view());
                data = joined;
            }
            Service* svc = find_service(data);
            return string(svc && svc->workers ? MMI_FOUND : MMI_NOT_FOUND);
        }
        if (service == MMI_PING) return std::to_string(getpid());
        if (service == MMI_STATS) return stats();
        return string(MMI_NOT_IMPLEMENTED);
    }

    // Broker.stats() as json.dumps writes it.
    string stats() {
        std::unordered_map<const Service*, size_t> busy;
        for (const WorkerPtr& worker : worker_list_)
            if (!worker->jobs.empty()) busy[worker->service] += 1;
        // Names that decode alike are one key in Python's dict: first place, last value.
        std::vector<std::pair<string, string>> entries;
        std::unordered_map<string, size_t> index;
        for (const auto& svc : service_list_) {
            size_t count = busy.count(svc.get()) ? busy[svc.get()] : 0;
            string key = json_string(utf8_replace(svc->name));
            string value = format(
                "{\"workers\": %zu, \"idle\": %zu, \"busy\": %zu, \"queued\": %zu, "
                "\"done\": %llu, \"failed\": %llu, \"job_ms\": ",
                svc->workers, svc->workers - count, count, svc->queue.size(), svc->done,
                svc->failed);
            value += svc->timed ? py_float_repr(round3(svc->job_time * 1000)) : "null";
            value += "}";
            auto found = index.find(key);
            if (found != index.end()) {
                entries[found->second].second = std::move(value);
            } else {
                index.emplace(key, entries.size());
                entries.emplace_back(std::move(key), std::move(value));
            }
        }
        string out = format("{\"pid\": %ld, \"uptime\": ", static_cast<long>(getpid()));
        out += py_float_repr(round3(wall_time() - started_));
        out += ", \"frontend\": " + json_string(settings_.frontend);
        out += ", \"backend\": " + json_string(settings_.backend);
        out += stopping_ ? ", \"stopping\": true" : ", \"stopping\": false";
        out += ", \"services\": {";
        for (size_t i = 0; i < entries.size(); ++i) {
            if (i) out += ", ";
            out += entries[i].first + ": " + entries[i].second;
        }
        out += "}}";
        return out;
    }

    // -- workers ----------------------------------------------------------------------

    // parse_backend, then broker.py's handle_worker.
    void handle_worker() {
        const size_t n = nin_;
        if (n < 4 || in_[1].size() != 0 || in_[2].view() != MDP_WORKER)
            protocol_error("bad backend envelope (%zu frames)", n);
        string_view address = in_[0].view(), command = in_[3].view();
        string_view service;
        bool extended = false;
        int credit = 1;
        if (command == READY) {
            if (n != 5) {
                if (n < 6 || n > 7 || in_[5].view() != EXT_TOKEN)
                    protocol_error("READY takes a service name, then optionally "
                                   "powerhose/1 and a credit");
                if (n == 7) credit = decode_credit(in_[6].view());
                extended = true;
            }
            service = in_[4].view();
            check_service(service);
        } else if (command == REPLY) {
            if (n < 7 || in_[5].size() != 0)
                protocol_error("REPLY needs client address, empty frame, body");
        } else if (command == HEARTBEAT || command == DISCONNECT) {
            if (n != 4) protocol_error("HEARTBEAT and DISCONNECT take no body");
        } else {
            // REQUEST included: parse_backend rejects it before handle_worker
            // could send DISCONNECT for it, and so does this port.
            protocol_error("unknown worker command %s", bytes_repr(command.substr(0, 4)).c_str());
        }

        WorkerPtr worker = find_worker(address);  // a reference: deletion must not free it here
        if (command == REPLY) {
            if (!worker) return disconnect(address);
            worker->expiry = monotonic() + liveness_;
            handle_reply(worker);
        } else if (command == HEARTBEAT) {
            // MDP: a valid but unexpected command gets DISCONNECT; this is
            // how workers of a previous broker learn to register again.
            if (!worker) return disconnect(address);
            worker->expiry = monotonic() + liveness_;
        } else if (command == READY) {
            if (worker) {  // MDP: a worker MUST NOT send a further READY
                delete_worker(worker);
                return disconnect(address);
            }
            if (starts_with(service, MMI_PREFIX)) return disconnect(address);
            register_worker(address, service, extended, credit);
        } else {  // DISCONNECT
            if (worker) delete_worker(worker, worker->extended);
        }
    }

    void register_worker(string_view address, string_view service, bool extended, int credit) {
        Service& svc = service_for(service);
        auto worker = std::make_shared<WorkerRef>();
        worker->address = string(address);
        worker->service = &svc;
        worker->extended = extended;
        worker->credit = credit;
        worker->expiry = monotonic() + liveness_;
        worker_list_.push_back(worker);
        workers_.emplace(string_view(worker->address), std::prev(worker_list_.end()));
        worker->listed = true;
        svc.workers += 1;
        log_.info("worker %s registered for %s (%s, credit %d)", hex(address).c_str(),
                  bytes_repr(service).c_str(), extended ? "powerhose" : "plain MDP", credit);
        worker_ready(worker);
    }

    void handle_reply(const WorkerPtr& worker) {
        WorkerRef& w = *worker;
        if (w.jobs.empty() || in_[4].view() != w.jobs.front()->address.view()) {
            log_.warning("worker %s replied to a job it does not hold; dropped",
                         hex(in_[0].view()).c_str());
            return;
        }
        // A worker runs its jobs in the order it got them: this is the oldest.
        JobPtr job = w.jobs.pop_front();
        Service& svc = *w.service;
        double now = monotonic();
        svc.ran(now - std::max(job->sent, w.last_reply));
        w.last_reply = now;
        const size_t n = nin_, body = nin_ - 6;  // body: in_[6..n)
        if (w.extended) {
            // protocol.reply_frames_ok: [job id, OK, result] or [job id, ERR, code,
            // message, type, traceback]; anything else costs the worker its place.
            string_view status = body >= 2 ? in_[7].view() : string_view{};
            bool well_formed = (status == STATUS_OK && body == 3) ||
                               (status == STATUS_ERROR && body == 6);
            if (!well_formed || in_[6].view() != job->job_id.view()) {
                fail(client_of(*job), ERR_BAD_REQUEST,
                     "worker " + hex(w.address) + " sent a malformed reply");
                delete_worker(worker);
                return disconnect(w.address);
            }
            if (status == STATUS_OK)
                svc.done += 1;
            else
                svc.failed += 1;
            if (job->extended) {
                // Both ends speak the extension: pass the frames through.
                add_copy(job->address);
                add("");
                add(EXT_CLIENT);
                add_copy(job->service);
                for (size_t i = 6; i < n; ++i) add_move(in_[i]);
                send_frontend();
            } else {
                reply_to_plain_client(*job, status);
            }
        } else {
            svc.done += 1;
            add_copy(job->address);
            add("");
            if (job->extended) {
                add(EXT_CLIENT);
                add_copy(job->service);
                add_copy(job->job_id);
                add(STATUS_OK);
                Msg joined;
                if (body == 1) {
                    add_move(in_[6]);
                } else {
                    string bytes;
                    for (size_t i = 6; i < n; ++i) bytes.append(in_[i].view());
                    joined.assign(bytes);
                    add_move(joined);
                }
                send_frontend();
            } else {
                add(MDP_CLIENT);
                add_copy(job->service);
                for (size_t i = 6; i < n; ++i) add_move(in_[i]);
                send_frontend();
            }
        }
        job.reset();
        worker_ready(worker);
    }

    // parse_worker_reply, then frontend_reply for a plain client; the reply's
    // frames were checked by handle_reply.
    void reply_to_plain_client(PendingJob& job, string_view status) {
        string code, message;
        if (status == STATUS_OK) {
            add_copy(job.address);
            add("");
            add(MDP_CLIENT);
            add_copy(job.service);
            add_move(in_[8]);
        } else {
            add_copy(job.address);
            add("");
            add(MDP_CLIENT);
            add_copy(job.service);
            add(STATUS_ERROR);
            for (size_t i : {size_t(8), size_t(9)}) {  // code and message, as UTF-8
                if (utf8_valid(in_[i].view())) {
                    add_move(in_[i]);
                } else {
                    (i == 8 ? code : message) = utf8_replace(in_[i].view());
                    add(i == 8 ? code : message);
                }
            }
        }
        send_frontend();
    }

    // A worker has room: give it the oldest live jobs, or put it in line.
    void worker_ready(const WorkerPtr& worker) {
        if (worker->vanished) return;
        Service& svc = *worker->service;
        double now = monotonic();
        size_t room = svc.capacity(*worker);
        while (!svc.queue.empty() && worker->jobs.size() < room) {
            JobPtr job = svc.queue.pop_front();
            if (job->has_deadline && job->deadline <= now) {
                fail(client_of(*job), ERR_TIMEOUT, timeout_message(*job));
            } else if (!send_job(worker, job, now)) {
                svc.queue.push_front(std::move(job));  // the worker vanished; the job waits
                return;
            }
        }
        if (stopping_ && svc.queue.empty()) return;
        if (worker->jobs.empty())
            svc.idle.push_back(worker);
        else
            list_spare(worker);
    }

    // Sends a new job to the LRU idle worker, else to a busy one with credit left.
    bool dispatch(Service& svc, JobPtr& job) {
        double now = monotonic();
        while (!svc.idle.empty()) {
            WorkerPtr worker = svc.idle.pop_front();
            if (send_job(worker, job, now)) {
                list_spare(worker);
                return true;
            }
        }
        while (!svc.spare.empty()) {
            WorkerPtr worker = svc.spare.pop_front();
            worker->spare = false;
            size_t held = worker->jobs.size();
            if (worker->vanished || !is_current(*worker) || !(0 < held && held < svc.capacity(*worker)))
                continue;  // went idle or away since it was listed, or jobs got long
            if (send_job(worker, job, now)) {
                list_spare(worker);
                return true;
            }
        }
        return false;
    }

    void list_spare(const WorkerPtr& worker) {
        Service& svc = *worker->service;
        if (worker->jobs.size() < svc.capacity(*worker) && !worker->spare) {
            worker->spare = true;
            svc.spare.push_back(worker);
        }
    }

    // backend_request; false (and the worker forgotten) if it vanished.  On
    // success the job moves into the worker's list.
    bool send_job(const WorkerPtr& worker, JobPtr& job, double now) {
        PendingJob& j = *job;
        j.sent = now;
        if (j.has_deadline) j.ttl = j.ttl_ms(now);
        char ttl[24];
        add(worker->address);
        add("");
        add(MDP_WORKER);
        add(REQUEST);
        add_copy(j.address);
        add("");
        if (worker->extended) {
            int len = snprintf(ttl, sizeof ttl, "%lld", j.ttl);
            add_copy(j.job_id);
            add(string_view(ttl, static_cast<size_t>(len)));
            add_copy(j.request_data());
            for (Msg& frame : j.headers) add_copy(frame);
        } else if (!j.body.empty()) {
            for (Msg& frame : j.body) add_copy(frame);
        } else {
            add_copy(j.data);
        }
        if (!send_worker(worker)) return false;
        worker->jobs.push_back(std::move(job));
        return true;
    }

    // Sends what was added to the backend; false if the worker's connection
    // is gone.  Such a worker gets nothing more; what happens to its jobs is
    // decided once everything it sent has been read (see bury_vanished).
    bool send_worker(const WorkerPtr& worker) {
        int err = flush(backend_, ZMQ_DONTWAIT);
        if (!err) return true;
        if (err != EHOSTUNREACH && err != EAGAIN) throw ZmqFatal{err};
        if (!worker->vanished && is_current(*worker)) {
            if (log_.debug_enabled())
                log_.debug("worker %s unreachable (%s)", hex(worker->address).c_str(),
                           zmq_strerror(err));
            worker->vanished = true;
            remove_worker(worker->service->idle, worker.get());
            vanished_.push_back(worker);
        }
        return false;
    }

    // Forgets workers whose connection closed, after reading their last words.
    // libzmq drops a closed peer's route before the application has read what
    // that peer sent: a worker that left cleanly has a DISCONNECT waiting (its
    // prefetched jobs are requeued); one that died has not (WorkerLostError).
    void bury_vanished() {
        while (events(backend_) & ZMQ_POLLIN) drain(backend_, &Broker::handle_worker);
        burying_.swap(vanished_);
        for (const WorkerPtr& worker : burying_) {
            if (is_current(*worker)) {
                log_.warning("worker %s is gone without a word: its connection closed",
                             hex(worker->address).c_str());
                delete_worker(worker);
            }
        }
        burying_.clear();
    }

    void disconnect(string_view address) {
        add(address);
        add("");
        add(MDP_WORKER);
        add(DISCONNECT);
        flush(backend_, ZMQ_DONTWAIT);  // a worker that cannot be told is gone anyway
    }

    // Forgets a worker; its jobs are requeued (never started) or failed.
    void delete_worker(const WorkerPtr& worker, bool requeue = false) {
        WorkerPtr keep = worker;  // the registration may hold the last reference
        WorkerRef& w = *keep;
        auto found = workers_.find(w.address);
        if (found != workers_.end() && found->second->get() == &w) {
            auto position = found->second;
            workers_.erase(found);
            worker_list_.erase(position);
        }
        Service& svc = *w.service;
        if (w.listed) {
            w.listed = false;
            svc.workers -= 1;
        }
        remove_worker(svc.idle, &w);
        if (w.jobs.empty()) return;
        Ring<JobPtr> jobs(std::move(w.jobs));
        if (requeue) {
            // An extended worker sends DISCONNECT only once it has answered
            // every job it started, so the jobs we still count crossed that
            // DISCONNECT on the wire and never ran.
            for (size_t i = jobs.size(); i-- > 0;) {
                jobs[i]->own_frames();
                svc.queue.push_front(std::move(jobs[i]));
            }
            while (!svc.queue.empty() && !svc.idle.empty()) worker_ready(svc.idle.pop_front());
        } else {
            for (size_t i = 0; i < jobs.size(); ++i) worker_lost(*jobs[i], w);
        }
    }

    void worker_lost(PendingJob& job, const WorkerRef& worker) {
        fail(client_of(job), ERR_WORKER_LOST,
             "worker " + hex(worker.address) + " serving " + str_repr(worker.service->name) +
                 " died or disconnected while running the job; check the worker's log");
    }

    // -- expiry and heartbeats ----------------------------------------------------------

    void expire_workers(double now) {
        for (const WorkerPtr& worker : worker_list_)
            if (worker->expiry < now) expired_.push_back(worker);
        for (const WorkerPtr& worker : expired_) {
            log_.warning("worker %s missed %d heartbeats; expired", hex(worker->address).c_str(),
                         settings_.liveness);
            delete_worker(worker);
            disconnect(worker->address);
        }
        expired_.clear();
    }

    // Fails queued jobs past their deadline, or waiting for no worker.
    void expire_jobs(double now) {
        const double no_worker = settings_.no_worker_timeout;
        for (const auto& service : service_list_) {
            Service& svc = *service;
            if (svc.queue.empty()) continue;
            size_t kept = 0, size = svc.queue.size();
            for (size_t i = 0; i < size; ++i) {
                PendingJob& job = *svc.queue[i];
                if (job.has_deadline && job.deadline <= now) {
                    fail(client_of(job), ERR_TIMEOUT, timeout_message(job));
                } else if (!svc.workers && now - job.received >= no_worker) {
                    fail(client_of(job), ERR_NO_WORKER,
                         "no worker serves " + str_repr(svc.name) + " on " + settings_.backend +
                             "; is powerhose-worker running with that --service?");
                } else {
                    if (kept != i) svc.queue[kept] = std::move(svc.queue[i]);
                    ++kept;
                }
            }
            svc.queue.truncate(kept);
        }
    }

    string timeout_message(const PendingJob& job) const {
        return format("job waited %.2fs in the queue for ", monotonic() - job.received) +
               str_repr(job.service.view()) +
               " and its deadline passed: all workers busy; add workers or raise the timeout";
    }

    void send_heartbeats() {
        for (const WorkerPtr& worker : worker_list_) {
            add(worker->address);
            add("");
            add(MDP_WORKER);
            add(HEARTBEAT);
            send_worker(worker);
        }
        if (probes_left_) probes_left_ -= 1;
    }

    void handle_monitor() {
        stale_[2] = true;
        for (;;) {
            if (zmq_msg_recv(monitor_event_.get(), monitor_, ZMQ_DONTWAIT) < 0) {
                int err = zmq_errno();
                if (err == EINTR) continue;
                if (err == EAGAIN) break;
                throw ZmqFatal{err};
            }
        }
        // A connection closed: find out whose, by probing (ROUTER_MANDATORY
        // makes a send to a vanished peer fail), now and for a few ticks
        // while libzmq finishes tearing the pipe down.
        probes_left_ = 4;
        send_heartbeats();
        next_heartbeat_ = monotonic() + 0.05;
    }

    // -- shutdown -------------------------------------------------------------------------

    bool drained(double now) {
        bool busy = false;
        for (const WorkerPtr& worker : worker_list_)
            if (!worker->jobs.empty()) {
                busy = true;
                break;
            }
        if (!busy && !queued_) return true;
        if (now - stopping_since_ < settings_.grace) return false;
        for (const auto& svc : service_list_) {
            for (size_t i = 0; i < svc->queue.size(); ++i)
                fail(client_of(*svc->queue[i]), ERR_NO_WORKER, "broker stopped before the job ran");
            svc->queue.clear();
        }
        for (const WorkerPtr& worker : worker_list_) {
            for (size_t i = 0; i < worker->jobs.size(); ++i)
                fail(client_of(*worker->jobs[i]), ERR_WORKER_LOST,
                     "broker stopped before the job finished (grace period over)");
            worker->jobs.truncate(0);
        }
        return true;
    }

    void disconnect_all() {
        for (const WorkerPtr& worker : worker_list_) disconnect(worker->address);
        workers_.clear();
        worker_list_.clear();
    }

    // -- validation (protocol.py) ------------------------------------------------------------

    static void check_service(string_view service) {
        if (service.empty() || service.size() > MAX_SERVICE_LENGTH)
            protocol_error("service name must be 1 to 255 bytes");
    }

    static void check_job_id(string_view job_id) {
        if (job_id.empty() || job_id.size() > MAX_JOB_ID_LENGTH)
            protocol_error("job id must be 1 to 255 bytes");
    }

    static long long decode_ttl(string_view frame) {
        if (!is_digits(frame) || frame.size() > 12)
            protocol_error("ttl must be decimal milliseconds, got %s",
                           bytes_repr(frame.substr(0, 20)).c_str());
        long long ttl = 0;
        for (char c : frame) ttl = ttl * 10 + (c - '0');
        return ttl;
    }

    static int decode_credit(string_view frame) {
        bool ok = is_digits(frame);
        int credit = 0;
        if (ok) {
            size_t i = frame.find_first_not_of('0');
            string_view digits = i == string_view::npos ? string_view() : frame.substr(i);
            ok = digits.size() <= 2;
            for (char c : digits) credit = credit * 10 + (c - '0');
            ok = ok && credit >= 1 && credit <= MAX_CREDIT;
        }
        if (!ok) protocol_error("credit must be 1 to %d", MAX_CREDIT);
        return credit;
    }

    void check_headers(size_t first, size_t n) const {
        if ((n - first) % 2) protocol_error("headers must come as key/value frame pairs");
        for (size_t i = first; i < n; ++i)
            if (!utf8_valid(in_[i].view())) protocol_error("headers must be UTF-8");
    }

    // -- state lookups ------------------------------------------------------------------------

    Service* find_service(string_view name) {
        auto found = services_.find(name);
        return found == services_.end() ? nullptr : found->second;
    }

    Service& service_for(string_view name) {
        if (Service* svc = find_service(name)) return *svc;
        service_list_.push_back(std::make_unique<Service>(name, queued_));
        Service* svc = service_list_.back().get();
        services_.emplace(string_view(svc->name), svc);
        return *svc;
    }

    WorkerPtr find_worker(string_view address) {
        auto found = workers_.find(address);
        return found == workers_.end() ? WorkerPtr() : *found->second;
    }

    bool is_current(const WorkerRef& worker) const {  // self.workers.get(address) is worker
        auto found = workers_.find(worker.address);
        return found != workers_.end() && found->second->get() == &worker;
    }

    static void remove_worker(Ring<WorkerPtr>& ring, const WorkerRef* worker) {
        for (size_t i = 0; i < ring.size(); ++i)
            if (ring[i].get() == worker) return ring.erase(i);
    }

    // -- sockets: multipart in and out ----------------------------------------------------------

    void* bind_router(const string& endpoint, Failure& failure) {
        void* sock = zmq_socket(context_, ZMQ_ROUTER);
        if (!sock) throw ZmqFatal{zmq_errno()};
        set_int(sock, ZMQ_LINGER, 1000);
        // Per-frame hard cap; jobs between max_job_size and this get a clear
        // JobTooLargeError, larger frames cost the sender its connection.
        const long long max_job = settings_.max_job_size;
        int64_t cap = max_job > (INT64_MAX - 65536) / 2 ? INT64_MAX : 2 * max_job + 65536;
        if (zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &cap, sizeof cap) != 0) {
            int err = zmq_errno();
            zmq_close(sock);
            throw ZmqFatal{err};
        }
        if (zmq_bind(sock, endpoint.c_str()) != 0) {
            int err = zmq_errno();
            set_int(sock, ZMQ_LINGER, 0);
            zmq_close(sock);
            failure.kind = Failure::OS_ERROR;
            failure.err = err;
            failure.message = endpoint + ": " + zmq_strerror(err);
            return nullptr;
        }
        return sock;
    }

    static void set_int(void* sock, int option, int value) {
        if (zmq_setsockopt(sock, option, &value, sizeof value) != 0) throw ZmqFatal{zmq_errno()};
    }

    // 0, 1, 2: the frontend, the backend, the monitor (run()'s order).
    size_t index_of(void* sock) const {
        return sock == frontend_ ? 0 : sock == backend_ ? 1 : 2;
    }

    static int events(void* sock) {
        for (;;) {
            int events = 0;
            size_t size = sizeof events;
            if (zmq_getsockopt(sock, ZMQ_EVENTS, &events, &size) == 0) return events;
            if (zmq_errno() != EINTR) throw ZmqFatal{zmq_errno()};
        }
    }

    // Reads one whole message into in_[0..nin_); false when none is waiting.
    bool recv_message(void* sock) {
        stale_[index_of(sock)] = true;
        nin_ = 0;
        for (;;) {
            if (nin_ == in_.size()) in_.emplace_back();
            zmq_msg_t* frame = in_[nin_].get();
            if (zmq_msg_recv(frame, sock, ZMQ_DONTWAIT) < 0) {
                int err = zmq_errno();
                if (err == EINTR) continue;
                if (err == EAGAIN && nin_ == 0) return false;
                throw ZmqFatal{err};
            }
            ++nin_;
            if (!zmq_msg_more(frame)) return true;
        }
    }

    // Frames would stay in in_ until overwritten, keeping libzmq's read
    // buffers (see Msg::own) or large frames: let them go now.
    void release_input() {
        for (size_t i = 0; i < nin_; ++i) in_[i].reset();
        if (in_.size() > 256) {
            in_.erase(in_.begin() + 256, in_.end());
            in_.shrink_to_fit();
        }
        nin_ = 0;
    }

    // Outgoing frames are listed with add*() and sent by flush(): bytes are
    // copied (short frames), add_copy() shares a frame, add_move() gives it away.
    struct Part {
        const char* data;
        size_t size;
        zmq_msg_t* msg;
        bool move;
    };

    void add(string_view bytes) { out_.push_back({bytes.data(), bytes.size(), nullptr, false}); }
    void add(const string& bytes) { add(string_view(bytes)); }
    void add(const char* text) { add(string_view(text)); }
    void add(string&&) = delete;  // the bytes must outlive flush()
    void add_copy(Msg& frame) { out_.push_back({nullptr, 0, frame.get(), false}); }
    void add_move(Msg& frame) { out_.push_back({nullptr, 0, frame.get(), true}); }

    // Sends the listed frames as one message; 0, or the errno of a first
    // frame that could not be queued (then nothing was sent, as with pyzmq).
    int flush(void* sock, int flags) {
        stale_[index_of(sock)] = true;
        const size_t n = out_.size();
        for (size_t i = 0; i < n; ++i) {
            const Part& part = out_[i];
            const int more = flags | (i + 1 < n ? ZMQ_SNDMORE : 0);
            int rc;
            for (;;) {
                if (!part.msg) {
                    rc = zmq_send(sock, part.size ? part.data : "", part.size, more);
                } else if (part.move) {
                    rc = zmq_msg_send(part.msg, sock, more);
                } else {
                    Msg copy;
                    if (zmq_msg_copy(copy.get(), part.msg) != 0) throw ZmqFatal{zmq_errno()};
                    rc = zmq_msg_send(copy.get(), sock, more);
                }
                if (rc >= 0 || zmq_errno() != EINTR) break;
            }
            if (rc < 0) {
                int err = zmq_errno();
                out_.clear();
                if (i == 0) return err;
                throw ZmqFatal{err};  // half a message sent: the socket is unusable
            }
        }
        out_.clear();
        return 0;
    }

    void send_frontend() {
        if (int err = flush(frontend_, 0)) throw ZmqFatal{err};
    }

    // -- state ----------------------------------------------------------------------------------

    JobPool pool_;  // first: every JobPtr below returns here when destroyed
    const Settings& settings_;
    const SignalGuard& signals_;
    Logger log_;
    const double heartbeat_;
    const double liveness_;  // seconds: heartbeat * liveness
    const double started_;
    long parent_;

    void* context_ = nullptr;
    void* frontend_ = nullptr;
    void* backend_ = nullptr;
    void* monitor_ = nullptr;
    // Whether a socket was used since run() last asked its ZMQ_EVENTS.
    bool stale_[3] = {true, true, true};

    size_t queued_ = 0;  // jobs in all service queues
    std::vector<std::unique_ptr<Service>> service_list_;  // in creation order, like the dict
    std::unordered_map<string_view, Service*> services_;  // keys view Service::name
    std::list<WorkerPtr> worker_list_;  // in registration order, like the dict
    std::unordered_map<string_view, std::list<WorkerPtr>::iterator> workers_;  // keys view address

    bool stopping_ = false;
    double stopping_since_ = 0;
    std::vector<WorkerPtr> vanished_, burying_, expired_;
    int probes_left_ = 0;
    double next_heartbeat_ = 0;
    double next_expiry_ = 0;
    unsigned long long mdp_ids_ = 0;

    std::vector<Msg> in_;  // the message being handled: in_[0..nin_)
    size_t nin_ = 0;
    std::vector<Part> out_;
    Msg monitor_event_;
};

Failure run_broker(const Settings& settings) {
    Failure failure;
    SignalGuard signals;
    if (signals.error()) {
        failure.kind = Failure::OS_ERROR;
        failure.err = signals.error();
        failure.message = strerror(signals.error());
        return failure;
    }
    try {
        Broker broker(settings, signals);
        if (broker.bind(failure)) broker.run();
        broker.close();
    } catch (const ZmqFatal& exc) {
        failure.kind = Failure::RUNTIME_ERROR;
        failure.message = zmq_strerror(exc.err);
    } catch (const std::bad_alloc&) {
        failure.kind = Failure::MEMORY_ERROR;
    } catch (const std::exception& exc) {
        failure.kind = Failure::RUNTIME_ERROR;
        failure.message = exc.what();
    }
    return failure;
}

// -- the Python module --------------------------------------------------------------------

PyObject* serve(PyObject*, PyObject* args, PyObject* kwargs) {
    static const char* keywords[] = {"frontend", "backend", "heartbeat", "liveness",
                                     "max_job_size", "no_worker_timeout", "grace",
                                     "parent_pid", "log_fd", "debug", nullptr};
    const char *frontend, *backend;
    double heartbeat, no_worker_timeout, grace;
    int liveness, parent_pid, log_fd, debug;
    long long max_job_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssdiLddiip:serve", const_cast<char**>(keywords),
                                     &frontend, &backend, &heartbeat, &liveness, &max_job_size,
                                     &no_worker_timeout, &grace, &parent_pid, &log_fd, &debug))
        return nullptr;
    Settings settings;
    settings.frontend = frontend;
    settings.backend = backend;
    settings.heartbeat = heartbeat;
    settings.liveness = liveness;
    settings.max_job_size = max_job_size;
    settings.no_worker_timeout = no_worker_timeout;
    settings.grace = grace;
    settings.parent_pid = parent_pid;
    settings.log_fd = log_fd;
    settings.debug = debug != 0;

    Failure failure;
    Py_BEGIN_ALLOW_THREADS
    failure = run_broker(settings);
    Py_END_ALLOW_THREADS

    switch (failure.kind) {
        case Failure::NONE:
            Py_RETURN_NONE;
        case Failure::OS_ERROR: {
            PyObject* exc = PyObject_CallFunction(PyExc_OSError, "is", failure.err,
                                                  failure.message.c_str());
            if (exc) {
                PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
                Py_DECREF(exc);
            }
            return nullptr;
        }
        case Failure::MEMORY_ERROR:
            return PyErr_NoMemory();
        case Failure::RUNTIME_ERROR:
            break;
    }
    PyErr_SetString(PyExc_RuntimeError, failure.message.c_str());
    return nullptr;
}

PyMethodDef methods[] = {
    {"serve", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(serve)),
     METH_VARARGS | METH_KEYWORDS,
     "serve(frontend, backend, heartbeat, liveness, max_job_size, no_worker_timeout, grace,\n"
     "      parent_pid, log_fd, debug)\n--\n\n"
     "Bind the frontend and backend ROUTERs and run the broker until SIGTERM or SIGINT\n"
     "(or the death of parent_pid, if not 0), then stop gracefully and return None.\n"
     "Log lines go to the file descriptor log_fd.  A failed bind raises OSError."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nbroker",
                      "The powerhose broker's message loop in C++ (see broker.py).", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__nbroker(void) { return PyModule_Create(&module); }
