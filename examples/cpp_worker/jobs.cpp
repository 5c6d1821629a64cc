#include "jobs.hpp"

#include <openssl/evp.h>

#include <memory>

namespace jobs {

namespace {

std::string echo(const Job& job) { return job.data; }

unsigned long rounds_of(const Job& job) {
    auto found = job.headers.find("rounds");
    if (found == job.headers.end()) return 1;
    const std::string& text = found->second;
    if (!text.empty() && text.size() <= 10 &&
        text.find_first_not_of("0123456789") == std::string::npos) {
        unsigned long rounds = std::stoul(text);
        if (rounds >= 1 && rounds <= MAX_ROUNDS) return rounds;
    }
    throw std::invalid_argument("header 'rounds' must be a whole number from 1 to " +
                                std::to_string(MAX_ROUNDS) + ", got '" + text + "'");
}

std::string hex(const unsigned char* bytes, size_t size) {
    static const char digits[] = "0123456789abcdef";
    std::string out;
    out.reserve(size * 2);
    for (size_t i = 0; i < size; ++i) {
        out += digits[bytes[i] >> 4];
        out += digits[bytes[i] & 0xf];
    }
    return out;
}

struct EvpMdCtxDeleter {
    void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

const EVP_MD* sha256_md() {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    // OpenSSL 3 looks EVP_sha256() up in its provider on every DigestInit;
    // fetching once makes a round several times cheaper.
    static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    if (md) return md;
#endif
    return EVP_sha256();
}

// Round 1 hashes the seed (the job data, any length); every further round
// hashes the previous round's raw 32-byte digest.  The result is the last
// digest in lowercase hex (64 ASCII characters), so that
//     h = seed; for _ in range(rounds): h = hashlib.sha256(h).digest()
// gives h.hex().
std::string sha256(const Job& job) {
    const unsigned long rounds = rounds_of(job);
    const EVP_MD* md = sha256_md();
    std::unique_ptr<EVP_MD_CTX, EvpMdCtxDeleter> ctx(EVP_MD_CTX_new());
    if (!ctx || !md) throw std::runtime_error("OpenSSL has no SHA-256");
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int size = 0;
    const void* input = job.data.data();
    size_t input_size = job.data.size();
    for (unsigned long round = 0; round < rounds; ++round) {
        if (EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1 ||
            EVP_DigestUpdate(ctx.get(), input, input_size) != 1 ||
            EVP_DigestFinal_ex(ctx.get(), digest, &size) != 1)
            throw std::runtime_error("OpenSSL SHA-256 failed");
        input = digest;
        input_size = size;
        // Checking the clock every 64k rounds costs nothing measurable and
        // stops a job whose client gave up within a few milliseconds.
        if ((round & 0xffff) == 0xffff && job.deadline && Clock::now() > *job.deadline)
            throw JobTimeout("gave up after " + std::to_string(round + 1) + " of " +
                             std::to_string(rounds) + " rounds: the job's ttl passed");
    }
    return hex(digest, size);
}

}  // namespace

bool exists(const std::string& name) { return name == "echo" || name == "sha256"; }

std::string run(const Job& job) {
    if (job.name == "echo") return echo(job);
    if (job.name == "sha256") return sha256(job);
    throw JobError("unknown job '" + job.name + "': this worker runs " + NAMES);
}

}  // namespace jobs
