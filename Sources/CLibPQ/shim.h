#ifndef CLIBPQ_SHIM_H
#define CLIBPQ_SHIM_H
// PostgreSQL's client library (libpq-dev on Debian and Ubuntu, libpq with Homebrew); pkg-config
// finds its include directory.
#include <libpq-fe.h>
#endif
