package kvshared

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	plugin "github.com/hashicorp/go-plugin"
)

// HostFlags are the flags gpkv and gpcounter share.
type HostFlags struct {
	Plugin   string
	AutoMTLS bool
	Timeout  time.Duration
	LogLevel string
}

// Add registers the flags on fs; env names the variable that holds the
// plugin command when --plugin is not given.
func (h *HostFlags) Add(fs *flag.FlagSet, env string) {
	fs.StringVar(&h.Plugin, "plugin", h.Plugin, "plugin command, run with sh -c (default: $"+env+")")
	fs.BoolVar(&h.AutoMTLS, "automtls", h.AutoMTLS, "ClientConfig.AutoMTLS")
	fs.DurationVar(&h.Timeout, "timeout", h.Timeout,
		"bound for the handshake, each call, and Kill")
	fs.StringVar(&h.LogLevel, "log-level", h.LogLevel,
		"go-plugin's log level on stderr (trace|debug|info|warn|error); the plugin's stderr is relayed at debug")
}

// DefaultHostFlags: 10 s, warnings and errors only.
func DefaultHostFlags() HostFlags {
	return HostFlags{Timeout: 10 * time.Second, LogLevel: "warn"}
}

// Command is the command line both clients share: FLAGS SUBCOMMAND
// [FLAGS] ARGS, the flags accepted before and after the subcommand.
type Command struct {
	Flags HostFlags
	Op    string        // the subcommand
	Sub   *flag.FlagSet // its flags: add the subcommand's own before Parse
	Usage func()        // prints the usage text and the flags, exits 2
	rest  []string
}

// NewCommand parses the flags before the subcommand.  usageText is the
// first part of the usage message (the subcommands); env names the
// variable that holds the plugin command.
func NewCommand(prog, usageText, env string) *Command {
	c := &Command{Flags: DefaultHostFlags()}
	c.Usage = func() {
		fmt.Fprint(os.Stderr, usageText+"FLAGS (also accepted after the subcommand):\n")
		fs := flag.NewFlagSet(prog, flag.ContinueOnError)
		h := DefaultHostFlags()
		h.Add(fs, env)
		fs.SetOutput(os.Stderr)
		fs.PrintDefaults()
		os.Exit(2)
	}
	top := flag.NewFlagSet(prog, flag.ExitOnError)
	top.Usage = c.Usage
	c.Flags.Add(top, env)
	top.Parse(os.Args[1:])
	if top.NArg() < 1 {
		c.Usage()
	}
	c.Op = top.Arg(0)
	c.rest = top.Args()[1:]
	c.Sub = flag.NewFlagSet(c.Op, flag.ExitOnError)
	c.Sub.Usage = c.Usage
	c.Flags.Add(c.Sub, env)
	return c
}

// Parse parses the subcommand's flags and returns its arguments.
func (c *Command) Parse() []string {
	c.Sub.Parse(c.rest)
	return c.Sub.Args()
}

// cleanup runs in Fail before the exit.
var cleanup func()

// Fail prints "FAIL <step>: <err>" on stderr, stops the plugin if one was
// started, and exits 1.
func Fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", step, err)
	if cleanup != nil {
		cleanup()
	}
	os.Exit(1)
}

// Within runs f and waits at most d for it (go-plugin v1.0.1 has calls
// without a deadline, for example the Shutdown inside Kill).
func Within(d time.Duration, f func() error) error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		return fmt.Errorf("timed out after %v", d)
	}
}

// Session is a launched plugin.
type Session struct {
	Client  *plugin.Client
	cmd     *exec.Cmd
	timeout time.Duration
}

// Launch starts the plugin as examples/*/main.go do (sh -c COMMAND, gRPC
// only, AutoMTLS if asked), connects and dispenses name.  Any failure is
// fatal (Fail).  After Launch, Fail also stops the plugin.
func Launch(h *HostFlags, env string, plugins map[string]plugin.Plugin, name string) (*Session, interface{}) {
	command := h.Plugin
	if command == "" {
		command = os.Getenv(env)
	}
	if command == "" {
		Fail("flags", errors.New("no plugin command: give --plugin CMD or set "+env))
	}
	cmd := exec.Command("sh", "-c", command)
	s := &Session{cmd: cmd, timeout: h.Timeout}
	s.Client = plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  Handshake,
		Plugins:          plugins,
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         h.AutoMTLS,
		StartTimeout:     h.Timeout,
		Logger: hclog.New(&hclog.LoggerOptions{
			Name:   "plugin",
			Level:  hclog.LevelFromString(h.LogLevel),
			Output: os.Stderr,
		}),
	})
	cleanup = s.Kill

	var rpc plugin.ClientProtocol
	err := Within(h.Timeout+time.Second, func() (err error) {
		rpc, err = s.Client.Client()
		return err
	})
	if err != nil {
		Fail("start", err)
	}
	raw, err := rpc.Dispense(name)
	if err != nil {
		Fail("dispense", err)
	}
	return s, raw
}

// Kill runs Client.Kill (Controller/Shutdown, 2 s grace, then SIGKILL),
// bounded by the timeout; if it hangs, the process gets SIGKILL.
func (s *Session) Kill() {
	err := Within(s.timeout, func() error { s.Client.Kill(); return nil })
	if err != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
	}
}
