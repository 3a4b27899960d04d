#ifndef CHATGW_CHIREDIS_SHIM_H
#define CHATGW_CHIREDIS_SHIM_H

#include <hiredis/hiredis.h>

// Swift cannot see the reader's error, a C array behind a macro; hand it out as a pointer.
static inline const char *chatgw_redis_reader_error(redisReader *reader) {
    return reader->errstr;
}

// REDIS_REPLY_* are macros; these name them for Swift.
static inline int chatgw_redis_reply_string(void) { return REDIS_REPLY_STRING; }
static inline int chatgw_redis_reply_array(void) { return REDIS_REPLY_ARRAY; }
static inline int chatgw_redis_reply_integer(void) { return REDIS_REPLY_INTEGER; }
static inline int chatgw_redis_reply_nil(void) { return REDIS_REPLY_NIL; }
static inline int chatgw_redis_reply_status(void) { return REDIS_REPLY_STATUS; }
static inline int chatgw_redis_reply_error(void) { return REDIS_REPLY_ERROR; }

#endif
