/*
 * A Dovecot 2.3 mail plugin for dovegate's tests that does what the public DRAC plugins
 * for Dovecot 2.x do: once a user is logged in (IMAP or POP3), call
 * dracauth(dracdserver, client address) so that the DRAC server lets the client relay.
 *
 *     mail_plugins = $mail_plugins drac
 *     plugin {
 *       dracdserver = 192.0.2.1     # default: localhost
 *     }
 *
 * IPv4 clients only (DRAC is IPv4). Written for dovegate (MIT); built at test time
 * against Debian's dovecot-dev with dracauth.c and rpcgen's stubs.
 */
#include "lib.h"
#include "net.h"
#include "mail-user.h"
#include "mail-storage-hooks.h"

#include <arpa/inet.h>

int dracauth(char *server, unsigned long userip, char **errmsg);

const char *drac_plugin_version = DOVECOT_ABI_VERSION;

void drac_plugin_init(struct module *module);
void drac_plugin_deinit(void);

static void drac_mail_user_created(struct mail_user *user)
{
	const char *server = mail_user_plugin_getenv(user, "dracdserver");
	const struct ip_addr *ip = user->conn.remote_ip;
	char *msg = "";
	int r;

	if (server == NULL || *server == '\0')
		server = "localhost";
	if (ip == NULL || ip->family != AF_INET) {
		i_warning("drac: %s is not an IPv4 client; nothing added",
			  ip == NULL ? "(none)" : net_ip2addr(ip));
		return;
	}
	r = dracauth((char *)server, ip->u.ip4.s_addr, &msg);
	if (r != 0)
		i_error("drac: dracauth(%s, %s) failed (%d): %s", server,
			net_ip2addr(ip), r, msg);
	else
		i_info("drac: %s added on %s", net_ip2addr(ip), server);
}

static struct mail_storage_hooks drac_mail_storage_hooks = {
	.mail_user_created = drac_mail_user_created,
};

void drac_plugin_init(struct module *module)
{
	mail_storage_hooks_add(module, &drac_mail_storage_hooks);
}

void drac_plugin_deinit(void)
{
	mail_storage_hooks_remove(&drac_mail_storage_hooks);
}
