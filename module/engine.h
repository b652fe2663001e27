/*
 * engine.h - the module's view of the call engine (common/callengine.h):
 * a call's owner (c->inst) is the module instance, and every call of an
 * instance belongs to its call set (inst->calls).  module.h sets that up.
 */
#ifndef RPCPLUGIN_MODULE_ENGINE_H
#define RPCPLUGIN_MODULE_ENGINE_H

#include "module.h"

#endif
