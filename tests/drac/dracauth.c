/*
 * A DRAC client for dovegate's tests: dracauth() as DRAC's libdrac documents it
 * (dracauth(3): clnt_create() on the server's rpcbind, then DRACPROC_ADD with the
 * address), and a command around it:
 *
 *     dracauth SERVER ADDRESS [udp|tcp]
 *
 * Exit status: the server's addstat (0 ADD_SUCCESS, 1 ADD_PERM, 2 ADD_SYSERR, 3 other),
 * 10 when the RPC itself failed. Built with -DDRACAUTH_NO_MAIN, it is the library the
 * Dovecot plugin (drac-plugin.c) links. Written for dovegate (MIT, see the repository's license);
 * built at test time with rpcgen's stubs from drac.x against libtirpc.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <rpc/rpc.h>

#include "drac.h"

/* The transport: DRAC's library uses UDP; "tcp" exercises the stream side. */
static const char *nettype = "udp";

/*
 * Asks SERVER to allow relaying from USERIP (network order). Returns the addstat, or -1
 * (no client: rpcbind does not know the program) or -2 (the call failed); ERRMSG says why.
 */
int
dracauth(char *server, unsigned long userip, char **errmsg)
{
	CLIENT *clnt;
	drac_add_parm arg;
	addstat *result;
	int status;

	clnt = clnt_create(server, DRACPROG, DRACVERS, nettype);
	if (clnt == NULL) {
		if (errmsg)
			*errmsg = clnt_spcreateerror(server);
		return -1;
	}
	/* XDR sends the host-order value big-endian: the address's bytes in order. */
	arg.ip_addr = ntohl(userip);
	result = dracproc_add_1(&arg, clnt);
	if (result == NULL) {
		if (errmsg)
			*errmsg = clnt_sperror(clnt, "call failed");
		clnt_destroy(clnt);
		return -2;
	}
	status = *result;
	clnt_destroy(clnt);
	if (errmsg) {
		switch (status) {
		case ADD_SUCCESS: *errmsg = "Server reports add succeeded"; break;
		case ADD_PERM: *errmsg = "Server reports permission denied"; break;
		case ADD_SYSERR: *errmsg = "Server reports system error"; break;
		default: *errmsg = "Server reports unknown error"; break;
		}
	}
	return status;
}

#ifndef DRACAUTH_NO_MAIN
int
main(int argc, char **argv)
{
	struct in_addr addr;
	char *msg = "";
	int r;

	if (argc < 3 || argc > 4 || inet_pton(AF_INET, argv[2], &addr) != 1) {
		fprintf(stderr, "usage: dracauth SERVER IPV4-ADDRESS [udp|tcp]\n");
		return 64;
	}
	if (argc == 4)
		nettype = argv[3];
	r = dracauth(argv[1], addr.s_addr, &msg);
	printf("%d %s\n", r, msg);
	if (r < 0)
		return 10;
	return r > 3 ? 3 : r;
}
#endif
