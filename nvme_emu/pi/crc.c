/* crc.c - the guard CRCs of end-to-end data protection, table-driven, 16 bytes per step.
 *
 * Two CRCs guard a logical block's data (NVM Command Set, "End-to-end Data Protection"):
 *
 *  - CRC-16/T10-DIF for the 16b Guard PI format: polynomial 0x8BB7, register initialised to 0,
 *    bits taken most significant first (no reflection), nothing XORed out;
 *  - CRC-64/NVME for the 64b Guard PI format: polynomial 0xAD93D23594C93659 taken least
 *    significant bit first (reflected in and out), register initialised to all ones and the
 *    result XORed with all ones.
 *
 * The polynomials are not written here: nvme_emu/pi/crc.py, the one place that holds the
 * models, passes them to nvme_emu_crc_init() when it loads this module, which fills the tables.
 *
 * Speed: byte-at-a-time table lookups cost about one dependent load per byte; processing 16
 * bytes per step with sixteen tables ("slice-by-16") makes the lookups of a step independent,
 * so the CPU overlaps them (bench/pi_crc.py measures the result per 4 KiB I/O).
 *
 * The bulk functions compute the guards of n blocks in one call, so a 4 KiB I/O of eight 512 B
 * blocks costs one Python -> C transition instead of eight. A block's guard covers block_len
 * bytes at buf + i * stride and then, when meta_len > 0, meta_len bytes at meta + i * meta_stride
 * (the metadata bytes in front of the PI when it is in the last bytes of separate metadata).
 * Every length is checked against the caller's buffer sizes here, in C, so a wrong argument is
 * an error code (Python raises ValueError), never a read out of bounds; the codes are
 * nvme_emu/pi/crc.py's BlocksError.
 *
 * Compiled as a cffi API-mode extension module on first use (nvme_emu/pi/crc.py).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the CRC-64 step loads 8 message bytes as one little-endian word"
#endif

#define EXPORT __attribute__((visibility("default")))

/* Bytes per step, and so tables: table k maps a byte to its contribution after k more zero
 * bytes have gone through. 16 measured 1.5-2.0x faster than 8 per 4 KiB (bench/README.md,
 * "pi_crc"); the tables are 8 KiB (CRC-16) and 32 KiB (CRC-64). */
#define SLICES 16

static uint16_t t16[SLICES][256];
static uint64_t t64[SLICES][256];

EXPORT void nvme_emu_crc_init(uint16_t poly16, uint64_t poly64_reflected)
{
    for (unsigned i = 0; i < 256; i++) {
        uint16_t r16 = (uint16_t)(i << 8);
        uint64_t r64 = i;
        for (int bit = 0; bit < 8; bit++) {
            r16 = (uint16_t)((r16 & 0x8000) ? (r16 << 1) ^ poly16 : r16 << 1);
            r64 = (r64 & 1) ? (r64 >> 1) ^ poly64_reflected : r64 >> 1;
        }
        t16[0][i] = r16;
        t64[0][i] = r64;
    }
    for (int k = 1; k < SLICES; k++) {
        for (unsigned i = 0; i < 256; i++) {
            uint16_t p16 = t16[k - 1][i];
            uint64_t p64 = t64[k - 1][i];
            t16[k][i] = (uint16_t)((p16 << 8) ^ t16[0][p16 >> 8]);
            t64[k][i] = (p64 >> 8) ^ t64[0][p64 & 0xff];
        }
    }
}

/* CRC-16/T10-DIF register after p[0..n): init 0 and xorout 0, so the register is the CRC. */
static uint16_t crc16_run(uint16_t c, const uint8_t *p, size_t n)
{
    while (n >= SLICES) {
        /* The 16-bit register folds into the step's first two message bytes. */
        c = t16[15][p[0] ^ (c >> 8)] ^ t16[14][p[1] ^ (c & 0xff)] ^ t16[13][p[2]] ^ t16[12][p[3]] ^
            t16[11][p[4]] ^ t16[10][p[5]] ^ t16[9][p[6]] ^ t16[8][p[7]] ^
            t16[7][p[8]] ^ t16[6][p[9]] ^ t16[5][p[10]] ^ t16[4][p[11]] ^
            t16[3][p[12]] ^ t16[2][p[13]] ^ t16[1][p[14]] ^ t16[0][p[15]];
        p += SLICES;
        n -= SLICES;
    }
    while (n--)
        c = (uint16_t)((c << 8) ^ t16[0][(c >> 8) ^ *p++]);
    return c;
}

/* CRC-64/NVME raw register (not inverted) after p[0..n). */
static uint64_t crc64_run(uint64_t c, const uint8_t *p, size_t n)
{
    while (n >= SLICES) {
        uint64_t a, b;
        memcpy(&a, p, 8); /* unaligned little-endian loads; gcc emits plain mov/ldr */
        memcpy(&b, p + 8, 8);
        a ^= c;
        c = t64[15][a & 0xff] ^ t64[14][(a >> 8) & 0xff] ^ t64[13][(a >> 16) & 0xff] ^
            t64[12][(a >> 24) & 0xff] ^ t64[11][(a >> 32) & 0xff] ^ t64[10][(a >> 40) & 0xff] ^
            t64[9][(a >> 48) & 0xff] ^ t64[8][a >> 56] ^
            t64[7][b & 0xff] ^ t64[6][(b >> 8) & 0xff] ^ t64[5][(b >> 16) & 0xff] ^
            t64[4][(b >> 24) & 0xff] ^ t64[3][(b >> 32) & 0xff] ^ t64[2][(b >> 40) & 0xff] ^
            t64[1][(b >> 48) & 0xff] ^ t64[0][b >> 56];
        p += SLICES;
        n -= SLICES;
    }
    while (n--)
        c = t64[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

/* Single buffers. `crc` is the CRC of the bytes before p (0 for none), so calls chain:
 * crc(a + b) == crc(b, seeded with crc(a)). For CRC-64 that means undoing the final inversion
 * on the way in, as Linux's crc64_nvme() does (QEMU's older helper took the raw register and
 * its callers had to invert by hand; hw/nvme once got that wrong for the metadata part). */
EXPORT uint16_t nvme_emu_crc16_t10dif(uint16_t crc, const uint8_t *p, size_t n)
{
    return crc16_run(crc, p, n);
}

EXPORT uint64_t nvme_emu_crc64_nvme(uint64_t crc, const uint8_t *p, size_t n)
{
    return ~crc64_run(~crc, p, n);
}

/* The argument checks of the bulk forms: 0 when n blocks fit, else a BlocksError code. */
static int check_blocks(size_t buf_size, size_t block_len, size_t stride, const uint8_t *meta,
                        size_t meta_size, size_t meta_len, size_t meta_stride, size_t n)
{
    if (n == 0)
        return 0;
    if (stride < block_len)
        return 1; /* BlocksError.STRIDE: blocks would overlap */
    /* (n - 1) * stride + block_len <= buf_size, without overflow (stride 0 means empty blocks) */
    if (block_len > buf_size || (stride && (n - 1) > (buf_size - block_len) / stride))
        return 2; /* BlocksError.DATA_SHORT */
    if (meta_len) {
        if (meta == NULL)
            return 3; /* BlocksError.META_MISSING */
        if (meta_stride < meta_len)
            return 4; /* BlocksError.META_STRIDE */
        if (meta_len > meta_size || (n - 1) > (meta_size - meta_len) / meta_stride) /* meta_stride > 0 */
            return 5; /* BlocksError.META_SHORT */
    }
    return 0;
}

EXPORT int nvme_emu_crc16_t10dif_blocks(const uint8_t *buf, size_t buf_size, size_t block_len, size_t stride,
                                        const uint8_t *meta, size_t meta_size, size_t meta_len, size_t meta_stride,
                                        uint16_t *out, size_t n)
{
    int rc = check_blocks(buf_size, block_len, stride, meta, meta_size, meta_len, meta_stride, n);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++) {
        uint16_t c = crc16_run(0, buf + i * stride, block_len);
        if (meta_len)
            c = crc16_run(c, meta + i * meta_stride, meta_len);
        out[i] = c;
    }
    return 0;
}

EXPORT int nvme_emu_crc64_nvme_blocks(const uint8_t *buf, size_t buf_size, size_t block_len, size_t stride,
                                      const uint8_t *meta, size_t meta_size, size_t meta_len, size_t meta_stride,
                                      uint64_t *out, size_t n)
{
    int rc = check_blocks(buf_size, block_len, stride, meta, meta_size, meta_len, meta_stride, n);
    if (rc)
        return rc;
    for (size_t i = 0; i < n; i++) {
        /* one raw register across data and metadata: inverted once in, once out */
        uint64_t c = crc64_run(~(uint64_t)0, buf + i * stride, block_len);
        if (meta_len)
            c = crc64_run(c, meta + i * meta_stride, meta_len);
        out[i] = ~c;
    }
    return 0;
}
